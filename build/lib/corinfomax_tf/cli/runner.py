"""The one way every command starts and fails.

    runner.run(main, define_flags)

parses the flags (a flagfile contradicting itself, an unknown flag or a bad value is
one line), sets the logging level, refuses stray arguments, and calls `main(FLAGS)`.
A `errors.UserError` raised anywhere below becomes `error: <message>` on stderr and
the exit status of its class (2; 75 for a lost worker; 143 for a preemption, whose
line starts with `preempted:`). Anything else is a bug and keeps its traceback.
"""

import os
import sys

# Before TensorFlow is imported: keep its C++ start-up chatter (INFO) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def prefer_wide_cpu_vectors(cpuinfo="/proc/cpuinfo"):
  """On a CPU with AVX-512, let XLA's CPU code use 512-bit vectors (its default is
  256): the augmentation's compiled photometric ops (augment.py) run about 20%
  faster. XLA reads XLA_FLAGS once, at its first compile; a setting of the user's
  is left alone."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_prefer_vector_width" in flags:
    return
  try:
    with open(cpuinfo) as f:   # every core lists the same flags: read the first
      line = next((l for l in f if l.startswith("flags")), "")
  except OSError:
    return
  wide = " avx512f" in line
  if wide:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_prefer_vector_width=512").strip()


prefer_wide_cpu_vectors()

from corinfomax_tf import errors  # noqa: E402


def log(line):
  """The commands' progress lines: stdout, flushed (a killed job keeps its log)."""
  print(line, flush=True)


def fail(error):
  """Prints a UserError as one line and exits with its status."""
  print(f"{error.prefix}: {error}", file=sys.stderr, flush=True)
  sys.exit(error.exit_code)


def run(main, define_flags, *, quiet_level="warning", required=()):
  """Defines the flags, parses argv and runs `main(FLAGS)` under the error policy.

  `required`: (flag, what it must be) pairs that must be given.
  """
  from absl import app
  from absl import flags
  from absl import logging

  from corinfomax_tf import flags as flags_lib
  define_flags()

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(quiet_level)
    try:
      if len(argv) > 1:
        raise errors.ConfigError(
            f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
      for name, what in required:
        if not flags.FLAGS[name].value:
          raise errors.ConfigError(f"--{name} is required ({what})")
      main(flags.FLAGS)
    except errors.UserError as e:
      fail(e)
    sys.stdout.flush()

  app.run(wrapped, flags_parser=flags_lib.parse_flags)
