"""The documentation site (mkdocs.yml) builds strictly: a broken link, anchor, block or
API reference fails here; the API reference has every public name with its Args and
Example, the command reference every command's --help."""

import html
import inspect
import os
import re
import subprocess
import sys

import pytest

import corinfomax_tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _text(path):
  with open(path, encoding="utf-8") as fh:
    return html.unescape(re.sub(r"<[^>]+>", "", fh.read()))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("site")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
       os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return out


@pytest.mark.slow
def test_the_api_reference_has_every_public_name_with_its_args_and_example(site):
  with open(site / "api" / "index.html", encoding="utf-8") as fh:
    page = fh.read()
  # Each name's section runs from its anchor to the next public name's.
  anchors = {name: f'id="{corinfomax_tf._API[name]}.{name}"' for name in corinfomax_tf.__all__}
  starts = {}
  for name, anchor in anchors.items():
    assert anchor in page, f"{name} is missing from the API reference"
    starts[name] = page.index(anchor)
  order = sorted(starts, key=starts.get)
  ends = dict(zip(order, [starts[n] for n in order[1:]] + [page.index('id="corinfomax_tf.config.')]))
  for name in corinfomax_tf.__all__:
    section = html.unescape(re.sub(r"<[^>]+>", " ", page[starts[name]:ends[name]]))
    value = getattr(corinfomax_tf, name)
    if issubclass_safe(value, BaseException):
      assert "Example" in section, f"{name}: no Example"
      continue
    takes_args = callable(value) and any(
        p.name != "self" for p in inspect.signature(value).parameters.values())
    if takes_args:
      assert "Parameters:" in section, f"{name}: no Args in the API reference"
    if callable(value):
      assert "Examples:" in section or "Example" in section, f"{name}: no Example"
  text = _text(site / "api" / "index.html")
  for name in ("TrainConfig", "DataConfig", "LinearEvalConfig", "SweepConfig"):
    assert f"corinfomax_tf.config.{name}" in page
  # A config class's table lists its settings with the flag's help.
  assert "--alpha" in text and "--la_R" in text and "--projector" in text


def issubclass_safe(value, cls):
  return inspect.isclass(value) and issubclass(value, cls)


@pytest.mark.slow
def test_the_command_reference_is_every_commands_help(site):
  from corinfomax_tf.cli import main
  text = _text(site / "commands" / "index.html")
  for name in main.COMMANDS:
    result = subprocess.run([sys.executable, "-m", "corinfomax_tf.cli.main", name, "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
      assert line.strip() in text, f"corinfomax {name} --help: {line!r} not on the page"


@pytest.mark.slow
def test_pages_and_generated_pages_are_all_in_the_site(site):
  pages = [p[:-3] for p in os.listdir(DOCS) if p.endswith(".md") and p != "index.md"]
  for page in pages + ["readme", "changelog", "api", "commands"]:
    assert (site / page / "index.html").is_file(), page
  # The README's links into docs/ point at the site's pages.
  with open(site / "readme" / "index.html", encoding="utf-8") as fh:
    readme = fh.read()
  assert 'href="../training/' in readme and "docs/training.md" not in readme


def _prose_lines(path):
  """(number, line) of a Markdown file outside its code blocks (fenced or indented)."""
  fenced = False
  with open(path, encoding="utf-8") as fh:
    for number, line in enumerate(fh, 1):
      if line.lstrip().startswith("```"):
        fenced = not fenced
        continue
      if not fenced and not line.startswith(("    ", "\t")):
        yield number, line


COMMAND_START = re.compile(r"^(python3? -m |python3? \S+\.py|corinfomax |pip |tensorboard |"
                           r"mkdocs |KERAS_BACKEND=)")


@pytest.mark.parametrize("page", sorted(p for p in os.listdir(DOCS) if p.endswith(".md")))
def test_no_command_is_left_out_of_a_code_block(page):
  """A command line at the left margin renders as a paragraph (its flags run together,
  `[--flag]` becomes a link): it belongs in an indented block."""
  bad = [f"{page}:{n}: {line.strip()}" for n, line in _prose_lines(os.path.join(DOCS, page))
         if COMMAND_START.match(line)]
  assert not bad, "\n".join(bad)


def test_the_no_command_check_finds_one(tmp_path):
  page = tmp_path / "p.md"
  page.write_text("# T\n\n    corinfomax train\n\n```\npython -m x\n```\n"
                  "python -m corinfomax_tf.train --flagfile=configs/digits.cfg\n")
  found = [n for n, line in _prose_lines(page) if COMMAND_START.match(line)]
  assert found == [8]
