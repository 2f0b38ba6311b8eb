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
import textwrap

from corinfomax_tf import errors
# Imported before the level is set below: it records whether the user set one.
from corinfomax_tf import quiet

# TensorFlow's C++ logging below ERROR is off unless the user set a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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


def start_tensorflow():
  """Imports TensorFlow with its C++ start-up lines kept off stderr (`quiet`).
  Commands call it after their flags are checked, so a bad flag costs no TensorFlow
  start-up."""
  quiet.start_tensorflow()


def log(line):
  """The commands' progress lines: stdout, flushed (a killed job keeps its log)."""
  print(line, flush=True)


def fail(error):
  """Prints a UserError as one line and exits with its status."""
  print(f"{error.prefix}: {error}", file=sys.stderr, flush=True)
  sys.exit(error.exit_code)


HELP_ARGS = ("--help", "-h", "-?", "--helpshort")

# Old flag name -> its name now. A command that renamed a flag still takes the old name,
# with one line saying so (`run(..., renamed=...)`). The evaluation commands' output
# directory is `--workdir`, as on every other command that owns a directory.
OUTPUT_DIR_RENAMED = {"output_dir": "workdir"}


def program_name(main):
  """How the user called the command: `corinfomax train` (the dispatcher sets it) or
  `python -m corinfomax_tf.train`."""
  name = sys.argv[0] if sys.argv else ""
  if name.startswith("corinfomax "):
    return name
  return f"python -m corinfomax_tf.{main.__module__.rsplit('.', 1)[-1]}"


def _flag_lines(flag):
  value = flag.default
  if isinstance(value, (list, tuple)):
    value = ",".join(str(v) for v in value)
  if isinstance(value, bool):
    head = f"  --[no]{flag.name} (default: {str(value).lower()})"
  else:
    shown = "none" if value is None else repr(value) if isinstance(value, str) else value
    head = f"  --{flag.name} (default: {shown})"
  text = flag.help or ""
  return [head] + textwrap.wrap(text, 84, initial_indent="      ", subsequent_indent="      ")


def help_text(main, own_flags, renamed=None):
  """The command's usage: its docstring and its own flags, grouped by config section
  (the flags absl and TensorFlow define are left to --helpfull); `renamed` (old name ->
  new) last, as deprecated names."""
  renamed = renamed or {}
  own_flags = [flag for flag in own_flags if flag.name not in renamed]
  from corinfomax_tf import flags as flags_lib
  doc = (sys.modules[main.__module__].__doc__ or "").strip("\n")
  lines = [f"usage: {program_name(main)} [--flagfile=FILE] [--name=value ...]", ""]
  if doc:
    lines += [doc.rstrip(), ""]
  groups = {}
  for flag in own_flags:
    groups.setdefault(flags_lib.GROUPS.get(flag.name, "command"), []).append(flag)
  for title, members in groups.items():
    lines.append(f"{title} flags:")
    for flag in members:
      lines += _flag_lines(flag)
    lines.append("")
  if renamed:
    lines.append("deprecated flags (still accepted, with one line):")
    lines += [f"  --{old}: the old name of --{new}" for old, new in renamed.items()]
    lines.append("")
  lines.append("--flagfile=FILE reads flags from a file (configs/<name>.cfg names a shipped "
               "one); --helpfull lists every flag, absl's own included.")
  return "\n".join(lines)


def check_backend(backends=("tensorflow",)):
  """The commands run on Keras' TensorFlow backend, `train` on JAX too: another one
  named by KERAS_BACKEND is one line, before TensorFlow starts, naming what does run
  on JAX (docs/backends.md)."""
  backend = os.environ.get("KERAS_BACKEND", "tensorflow")
  if backend not in backends:
    raise errors.ConfigError(
        f"KERAS_BACKEND={backend}: this command runs on the TensorFlow backend only "
        "(`corinfomax train` runs on JAX too: docs/backends.md); unset KERAS_BACKEND or "
        "set it to tensorflow")


def define_renamed(renamed):
  """A string flag for each old name in `renamed` (old -> new), read by
  `apply_renamed`."""
  from absl import flags
  for old, new in renamed.items():
    flags.DEFINE_string(old, None, f"Deprecated: the old name of --{new}.")


def apply_renamed(renamed, values, warn=None):
  """Gives each new flag the value its old name was given, with one deprecation line
  (on stderr); the two names set to different values are a ConfigError."""
  warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
  for old, new in renamed.items():
    if not values[old].present:
      continue
    given = values[old].value
    if values[new].present and values[new].value != given:
      raise errors.ConfigError(
          f"--{old}={given} and --{new}={values[new].value}: --{old} is the old name of "
          f"--{new}; give --{new} alone")
    warn(f"warning: --{old} is deprecated: it is the old name of --{new}; "
         f"use --{new}={given}")
    values[new].value = given


def run(main, define_flags, *, quiet_level="warning", required=(),
        backends=("tensorflow",), renamed=None):
  """Defines the flags, parses argv and runs `main(FLAGS)` under the error policy.

  `--help` prints the command's own flags and exits 0 before anything else (no
  TensorFlow). `required`: (flag, what it must be) pairs that must be given.
  `backends`: the Keras backends the command runs on (KERAS_BACKEND). `renamed`: old
  flag name -> new name (OUTPUT_DIR_RENAMED), the old name accepted with one line.
  """
  from absl import app
  from absl import flags
  from absl import logging

  from corinfomax_tf import flags as flags_lib
  absl_own = set(flags.FLAGS)
  define_flags()
  renamed = renamed or {}
  define_renamed(renamed)
  if any(arg in HELP_ARGS for arg in sys.argv[1:]):
    print(help_text(main, [flags.FLAGS[name] for name in flags.FLAGS
                           if name not in absl_own], renamed))
    sys.exit(0)

  def wrapped(argv):
    if flags.FLAGS["verbosity"].present:
      quiet.show_everything()
    else:
      logging.set_verbosity(quiet_level)
    try:
      if len(argv) > 1:
        raise errors.ConfigError(
            f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
      apply_renamed(renamed, flags.FLAGS)
      for name, what in required:
        if not flags.FLAGS[name].value:
          raise errors.ConfigError(f"--{name} is required ({what})")
      check_backend(backends)
      main(flags.FLAGS)
    except errors.UserError as e:
      fail(e)
    sys.stdout.flush()

  app.run(wrapped, flags_parser=flags_lib.parse_flags)
