"""The documentation: every relative link resolves, every command it names exists and
its flags parse (not run), the README stays short and free of dates, and every public
name of the Python API has a docstring with its arguments and an example."""

import glob
import inspect
import json
import os
import re
import shlex
import sys

import pytest

import helpers

ROOT = helpers.ROOT
PAGES = sorted([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md")] +
               glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOCS = [os.path.join(ROOT, "docs", name) for name in (
    "index.md", "data.md", "training.md", "sweep.md", "backbones-and-api.md", "distributed.md",
    "evaluation.md", "finetuning-and-detection.md", "export.md", "fidelity.md",
    "performance.md", "benchmarks.md", "troubleshooting.md", "development.md")]


def _read(path):
  with open(path, encoding="utf-8") as fh:
    return fh.read()


def relative_links(text):
  """The targets of Markdown links [text](target) that are not URLs or anchors (code
  left out: `f(x)[0](y)` is no link)."""
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  text = re.sub(r"`[^`\n]*`", "", text)
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
      yield target


def test_every_page_a_user_comes_for_exists_and_links_resolve():
  for path in DOCS:
    assert os.path.isfile(path), path
  assert not os.path.exists(os.path.join(ROOT, "BENCHMARKS.md"))
  assert not os.path.exists(os.path.join(ROOT, "export", "README.md"))
  checked = 0
  for page in PAGES:
    for target in relative_links(_read(page)):
      resolved = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
      assert os.path.exists(resolved), (os.path.relpath(page, ROOT), target)
      checked += 1
  assert checked >= 30, checked


def test_the_readme_is_short_and_free_of_dates():
  text = _read(os.path.join(ROOT, "README.md"))
  assert len(text.splitlines()) <= 200
  assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text)
  for heading in ("## The two commands", "## Install", "## Command line",
                  "## Python quick start", "## Results on the embedded default"):
    assert heading in text, heading


def test_the_changelog_has_a_section_per_release_newest_first():
  versions = re.findall(r"^## (\d+)\.(\d+)\.(\d+)", _read(os.path.join(ROOT, "CHANGELOG.md")),
                        re.M)
  assert len(versions) >= 2
  as_ints = [tuple(map(int, v)) for v in versions]
  assert as_ints == sorted(as_ints, reverse=True)
  import corinfomax_tf
  assert ".".join(versions[0]) == corinfomax_tf.__version__


# ----------------------------------------------------------------------------
# Commands named in the docs.
# ----------------------------------------------------------------------------

COMMAND = re.compile(r"(python -m corinfomax_tf\.[a-z_]+|python export/export_encoder\.py|"
                     r"corinfomax [a-z][a-z-]*)((?:\s+\S+)*)")


def _snippets(text):
  """Code the page shows: fenced and indented blocks (continuation lines joined) and
  inline code spans."""
  text = re.sub(r"\\\n\s*", " ", text)
  blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
  rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
  lines = [line for block in blocks for line in block.splitlines()]
  lines += [line.strip() for line in rest.splitlines() if line.startswith("    ")]
  lines += re.findall(r"`([^`\n]+)`", rest)
  return lines


def documented_commands(text):
  """[(command, [flag arguments])] of every command line the text shows; lines with
  placeholders (<...>) or elisions (...) are left out, optional [--flags] dropped."""
  out = []
  for line in _snippets(text):
    line = re.split(r"\s(?:&&|\||;|#)\s", " " + line + " ")[0]
    for match in COMMAND.finditer(line):
      command, args = match.group(1), re.sub(r"\s\[[^\]]*\]", " ", match.group(2))
      if "<" in args or "..." in args or "<" in command:
        continue
      try:
        tokens = shlex.split(args)
      except ValueError:
        tokens = args.split()
      flags = []
      for token in tokens:
        if not token.startswith("--"):
          break
        flags.append(token)
      out.append((command, flags))
  return out


def _cli_module(command):
  from corinfomax_tf.cli import main
  if command.startswith("corinfomax "):
    name = command.split()[1]
    assert name in main.COMMANDS, f"unknown subcommand in the docs: {command}"
    return main.COMMANDS[name][0]
  if command == "python export/export_encoder.py":
    return "export"
  module = command.split("corinfomax_tf.", 1)[1]
  import importlib.util
  assert importlib.util.find_spec(f"corinfomax_tf.{module}") is not None, command
  return module


# Parses each command line's flags as the command would (its flag definitions, the
# flagfiles it names, absl's parser), in a process of its own per command module.
PARSE = r"""
import contextlib, importlib, io, json, sys
from absl import flags
from corinfomax_tf import flags as flags_lib
module = importlib.import_module("corinfomax_tf.cli." + sys.argv[1])
getattr(module, "define_flags", flags_lib.define_flags)()
failures = []
for argv in json.loads(sys.argv[2]):
  # absl's --help/--helpfull act in app.run, not in the parser.
  argv = [a for a in argv if a not in ("--help", "--helpfull", "--helpshort")]
  flags.FLAGS.unparse_flags()
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      flags_lib.parse_flags(["command", *argv])
  except SystemExit:
    failures.append([argv, err.getvalue().strip()])
print(json.dumps(failures))
"""


def test_commands_are_found_in_the_docs():
  found = documented_commands("Run\n\n    corinfomax train --flagfile=configs/digits.cfg \\\n"
                              "        --workdir=runs/a && echo\n\nor `python -m "
                              "corinfomax_tf.knn_eval --encoder=E [--json] --k=5`, not "
                              "`corinfomax <command> --help`.\n")
  assert found == [("corinfomax train", ["--flagfile=configs/digits.cfg", "--workdir=runs/a"]),
                   ("python -m corinfomax_tf.knn_eval", ["--encoder=E", "--k=5"])]


@pytest.mark.slow
def test_every_command_named_in_the_docs_exists_and_its_flags_parse():
  by_module = {}
  for page in PAGES:
    for command, flags in documented_commands(_read(page)):
      by_module.setdefault(_cli_module(command), []).append(flags)
  assert {"train", "export", "linear_eval", "knn_eval", "finetune", "detect", "embed",
          "benchmark", "data_service", "sweep"} <= set(by_module), sorted(by_module)
  assert sum(len(v) for v in by_module.values()) >= 40
  failures = []
  for module, argvs in sorted(by_module.items()):
    result = helpers.run([sys.executable, "-c", PARSE, module, json.dumps(argvs)],
                            capture_output=True, text=True, cwd=ROOT, env=helpers.ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    failures += [(module, *f) for f in json.loads(result.stdout.strip().splitlines()[-1])]
  assert not failures, failures


# ----------------------------------------------------------------------------
# Docstrings of the Python API.
# ----------------------------------------------------------------------------


def test_every_public_name_has_a_docstring_with_args_and_an_example():
  import corinfomax_tf
  checked = 0
  for name in corinfomax_tf.__all__:
    obj = getattr(corinfomax_tf, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
      continue  # constants (PAPER_VIEWS) are documented in docs/backbones-and-api.md
    doc = inspect.getdoc(obj) or ""
    assert len(doc.splitlines()) >= 5, name
    assert "Example" in doc and "```python" in doc, name
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = [p for p in inspect.signature(target).parameters
              if p not in ("self", "args", "kwargs")]
    if params:
      assert "Args:" in doc, name
    checked += 1
  assert checked >= 12, checked
