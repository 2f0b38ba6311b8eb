"""The command line starts at once: usage, each command's --help and a bad flag's line
come without TensorFlow; TensorFlow's start-up chatter stays off the console."""

import json
import os
import subprocess
import sys

import pytest

import helpers
from corinfomax_tf import quiet
from corinfomax_tf.cli import main as cli_main

# One command's --help in a fresh process: its output, exit status, the flags the
# command defined (absl's own left out) and whether TensorFlow was imported.
HELP = r"""
import contextlib, io, json, sys
import absl.app, absl.logging
from absl import flags
absl_own = set(flags.FLAGS)
out, code = io.StringIO(), None
with contextlib.redirect_stdout(out):
  try:
    if sys.argv[1] == "-m":  # python -m corinfomax_tf.<module> --help
      import runpy
      module, sys.argv = sys.argv[2], [sys.argv[2], "--help"]
      runpy.run_module("corinfomax_tf." + module, run_name="__main__")
    else:
      from corinfomax_tf.cli import main
      code = main.main(["corinfomax", *sys.argv[1:]])
  except SystemExit as e:
    code = e.code
print(json.dumps({"out": out.getvalue(), "code": code, "tensorflow": "tensorflow" in sys.modules,
                  "own": sorted(set(flags.FLAGS) - absl_own)}))
"""


def _help(*args):
  env = dict(helpers.ENV)
  env.pop("TF_CPP_MIN_LOG_LEVEL")
  result = subprocess.run([sys.executable, "-c", HELP, *args], capture_output=True,
                          text=True, cwd=helpers.ROOT, env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not result.stderr.strip(), result.stderr[-2000:]   # no TensorFlow line, nothing
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_usage_and_every_commands_help_come_without_tensorflow():
  usage = _help("--help")
  assert usage["code"] == 0 and not usage["tensorflow"]
  assert all(name in usage["out"] for name in cli_main.COMMANDS)
  for name in cli_main.COMMANDS:
    shown = _help(name, "--help")
    assert shown["code"] == 0, (name, shown["out"][-500:])
    assert not shown["tensorflow"], name
    assert shown["out"].startswith(f"usage: corinfomax {name} "), shown["out"][:200]
    assert len(shown["own"]) >= 5, (name, shown["own"])
    missing = [flag for flag in shown["own"]
               if f"  --{flag} (default" not in shown["out"]
               and f"  --[no]{flag} (default" not in shown["out"]
               and f"  --{flag}: the old name of --" not in shown["out"]]
    assert not missing, (name, missing)
    assert "flags:" in shown["out"]


@pytest.mark.slow
def test_python_m_help_lists_the_flags_grouped_by_config_section():
  shown = _help("-m", "train")
  assert shown["code"] == 0 and not shown["tensorflow"]
  out = shown["out"]
  assert out.startswith("usage: python -m corinfomax_tf.train ")
  headings = [line for line in out.splitlines() if line.endswith(" flags:")]
  assert headings[:6] == ["data flags:", "augmentation flags:", "model flags:", "loss flags:",
                          "optimizer flags:", "training flags:"], headings
  assert "  --batch_size (default: 512)" in out and "  --alpha (default: " in out
  assert "  --[no]export (default: " in out
  assert "--helpfull" in out
  sweep = _help("-m", "sweep")
  assert "sweep flags:" in sweep["out"] and "  --search (default: " in sweep["out"]


@pytest.mark.slow
def test_a_bad_flag_is_one_line_without_tensorflow(tmp_path):
  # A value of the wrong type (absl's parser) and one the config refuses (our checks):
  # each one line, exit 2, and neither starts TensorFlow.
  script = ("import sys\nfrom corinfomax_tf.cli import main\ntry:\n"
            "  main.main(['corinfomax', 'train', *sys.argv[1:]])\nexcept SystemExit as e:\n"
            "  print('tensorflow' in sys.modules, e.code)\n")
  for args, needle in ((["--batch_size=abc"], "--batch_size=abc"),
                       (["--batch_size=-4", f"--workdir={tmp_path}/w"], "--batch_size")):
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                            text=True, cwd=helpers.ROOT, env=helpers.ENV, timeout=120)
    assert result.stdout.split() == ["False", "2"], (result.stdout, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
  # Another Keras backend than a command runs on: one line, before TensorFlow starts.
  result = subprocess.run([sys.executable, "-c", script.replace("'train'", "'export'"),
                           f"--workdir={tmp_path}/w", f"--export_dir={tmp_path}/e"],
                          capture_output=True, text=True, cwd=helpers.ROOT,
                          env=dict(helpers.ENV, KERAS_BACKEND="jax"), timeout=120)
  assert result.stdout.split() == ["False", "2"], (result.stdout, result.stderr[-2000:])
  assert result.stderr.strip().splitlines() == [
      "error: KERAS_BACKEND=jax: this command runs on the TensorFlow backend only "
      "(`corinfomax train` runs on JAX too: docs/backends.md); unset KERAS_BACKEND or "
      "set it to tensorflow"]


def _command_in_process(command, *args):
  """`corinfomax <command> *args` in a fresh process: (stdout words: whether TensorFlow was
  imported and the exit status, stderr lines)."""
  script = ("import sys\nfrom corinfomax_tf.cli import main\ntry:\n"
            f"  main.main(['corinfomax', '{command}', *sys.argv[1:]])\n"
            "except SystemExit as e:\n  print('tensorflow' in sys.modules, e.code)\n")
  result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, cwd=helpers.ROOT, env=helpers.ENV, timeout=120)
  return result.stdout.split(), result.stderr.strip().splitlines()


# A value each command refuses, and the start of its line.
BAD_VALUES = {
    "train": (["--batch_size=-4"], "error: --batch_size=-4: must be >= "),
    "export": (["--workdir=/nonexistent/w", "--export_dir=/tmp/e"],
               "error: --workdir=/nonexistent/w: no config.json"),
    "linear-eval": (["--encoder=E", "--batch_size=0"], "error: --batch_size=0: must be >= 1"),
    "knn-eval": (["--encoder=E", "--temperature=0"], "error: --temperature=0.0: must be > 0"),
    "finetune": (["--encoder=E", "--batch_size=0"], "error: --batch_size=0: must be >= "),
    "detect": (["--encoder=E", "--batch_size=0"], "error: --batch_size=0: must be >= "),
    "embed": (["--encoder=E", "--batch_size=0"], "error: --batch_size=0: must be >= "),
    "sweep": (["--search=alphax:log:1:2"], "error: --search=alphax:log:1:2: unknown parameter"),
    "benchmark": (["--batch_size=0"], "error: --batch_size=0: must be >= "),
    "data-service": (["--role=worker", "--port=-1"], "error: --port=-1: must be in [0, 65535]"),
}


@pytest.mark.slow
def test_every_commands_refused_value_is_one_line_without_tensorflow():
  assert set(BAD_VALUES) == set(cli_main.COMMANDS)
  for command, (args, start) in BAD_VALUES.items():
    words, lines = _command_in_process(command, *args)
    assert words == ["False", "2"], (command, words, lines[-5:])
    assert len(lines) == 1 and lines[0].startswith(start), (command, lines)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["linear-eval", "knn-eval", "embed"])
def test_output_dir_is_the_old_name_of_workdir_with_one_line(command, tmp_path):
  args, start = BAD_VALUES[command]
  given = [*args, f"--output_dir={tmp_path}/out"]
  words, lines = _command_in_process(command, *given)
  assert words == ["False", "2"], (words, lines[-5:])
  assert len(lines) == 2 and lines[1].startswith(start), lines
  assert lines[0] == (f"warning: --output_dir is deprecated: it is the old name of "
                      f"--workdir; use --workdir={tmp_path}/out")
  # Both names with two values: one line naming both.
  words, lines = _command_in_process(command, *given, f"--workdir={tmp_path}/w")
  assert words == ["False", "2"]
  assert lines == [
      f"error: --output_dir={tmp_path}/out and --workdir={tmp_path}/w: --output_dir is the "
      "old name of --workdir; give --workdir alone"]
  shown = _help(command, "--help")["out"]
  assert "  --workdir (default: '')" in shown
  assert "deprecated flags (still accepted, with one line):\n  --output_dir: the old name of " \
      "--workdir" in shown


def test_a_renamed_flag_gives_its_value_to_the_new_name():
  from absl import flags
  from corinfomax_tf import errors
  from corinfomax_tf.cli import runner
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", "", "new", flag_values=values)
  flags.DEFINE_string("output_dir", None, "old", flag_values=values)
  lines = []
  values(["x", "--output_dir=/a"])
  runner.apply_renamed(runner.OUTPUT_DIR_RENAMED, values, warn=lines.append)
  assert values.workdir == "/a" and len(lines) == 1 and "--output_dir is deprecated" in lines[0]
  values.unparse_flags()
  values(["x", "--workdir=/b"])           # the new name alone: no line
  runner.apply_renamed(runner.OUTPUT_DIR_RENAMED, values, warn=lines.append)
  assert values.workdir == "/b" and len(lines) == 1
  values.unparse_flags()
  values(["x", "--workdir=/b", "--output_dir=/b"])   # the same value twice is fine
  runner.apply_renamed(runner.OUTPUT_DIR_RENAMED, values, warn=lines.append)
  assert values.workdir == "/b" and len(lines) == 2
  values.unparse_flags()
  values(["x", "--workdir=/b", "--output_dir=/c"])
  with pytest.raises(errors.ConfigError, match="--output_dir=/c and --workdir=/b"):
    runner.apply_renamed(runner.OUTPUT_DIR_RENAMED, values, warn=lines.append)


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_filtered_and_other_lines_kept():
  # In a fresh process with no TF_CPP_MIN_LOG_LEVEL of the user's: the start-up lines
  # TensorFlow writes whatever the level are gone; a line that is not known noise is
  # passed on.
  script = ("import os, sys\nfrom corinfomax_tf import quiet\n"
            "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'\n"
            "quiet.start_tensorflow()\n"
            "with quiet.filtered_stderr(quiet.START_UP):\n"
            "  os.write(2, b'I0000 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
            "  os.write(2, b'a line of the user\\n')\n"
            "print('tensorflow' in sys.modules)\n")
  env = dict(helpers.ENV)
  env.pop("TF_CPP_MIN_LOG_LEVEL")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=helpers.ROOT, env=env, timeout=120)
  assert result.returncode == 0 and result.stdout.split() == ["True"], result.stderr[-2000:]
  assert result.stderr.strip() == "a line of the user", result.stderr[-2000:]
  # A level the user set shows everything.
  env["TF_CPP_MIN_LOG_LEVEL"] = "0"
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=helpers.ROOT, env=env, timeout=120)
  assert "cudart_stub.cc" in result.stderr and "a line of the user" in result.stderr


def test_start_up_pattern_matches_tensorflows_lines_and_not_others():
  for line in ("WARNING: All log messages before absl::InitializeLog() is called are "
               "written to STDERR",
               "I0000 00:00:1796314639.495460   10190 cudart_stub.cc:31] Could not find "
               "cuda drivers on your machine, GPU will not be used.",
               "E0000 00:00:1796314658.591251   10245 cuda_platform.cc:52] failed call to "
               "cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"):
    assert quiet.START_UP.search(line), line
  for line in ("error: --batch_size=abc", "Traceback (most recent call last):",
               "E0000 something.cc:1] a real error"):
    assert not quiet.START_UP.search(line), line
  assert quiet.LITERT.search("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")


def test_the_package_imports_without_tensorflow_until_a_name_is_used():
  import corinfomax_tf
  assert set(corinfomax_tf.__all__) <= set(dir(corinfomax_tf))
  with pytest.raises(AttributeError, match="no attribute 'nothing'"):
    corinfomax_tf.nothing  # noqa: B018
  # Every public name resolves to the object its module defines.
  for name in corinfomax_tf.__all__:
    assert getattr(corinfomax_tf, name) is not None, name
  assert os.path.basename(corinfomax_tf.__file__) == "__init__.py"
