"""MkDocs hooks (mkdocs.yml `hooks:`): the pages generated at build time.

- readme.md and changelog.md: the repository's README.md and CHANGELOG.md, their links
  into docs/ rewritten for the site;
- api.md: the API reference, one mkdocstrings block per name in
  `corinfomax_tf.__all__` (from the module that defines it) and one per config class,
  with a table of its settings read from the dataclass fields (their defaults, help and
  checks, the same ones the flags are made of);
- commands.md: every command's `--help`, run at build time, so the reference is the
  help text itself.

Links from the docs pages to ../README.md and ../CHANGELOG.md (right on GitHub) are
pointed at the generated pages.
"""

import dataclasses
import os
import re
import subprocess
import sys

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The config classes in the API reference, in the order a user meets them.
CONFIG_CLASSES = ("Config", "DataConfig", "AugmentConfig", "ModelConfig", "LossConfig",
                  "OptimConfig", "TrainConfig", "LinearEvalConfig", "KnnEvalConfig",
                  "FinetuneConfig", "DetectionDataConfig", "DetectConfig", "EmbedConfig",
                  "ExportConfig", "SweepConfig")


def _read(name):
  with open(os.path.join(ROOT, name), encoding="utf-8") as fh:
    return fh.read()


def _site_links(markdown):
  """Links written for the repository (README -> docs/x.md, docs -> ../README.md) as
  links between the site's pages."""
  markdown = re.sub(r"\]\((?:\.\./)?docs/", "](", markdown)
  markdown = re.sub(r"\]\((?:\.\./)?README\.md", "](readme.md", markdown)
  return re.sub(r"\]\((?:\.\./)?CHANGELOG\.md", "](changelog.md", markdown)


def _cell(text):
  return str(text).replace("|", "\\|").replace("\n", " ")


def _settings_table(cls):
  rows = ["| setting (flag) | default | what it is |", "|---|---|---|"]
  for field in dataclasses.fields(cls):
    if "help" not in field.metadata:
      continue
    default = field.default
    if default is dataclasses.MISSING:
      default = "(required)"
    extra = ""
    if field.metadata.get("choices"):
      extra += " One of: " + ", ".join(f"`{c}`" for c in field.metadata["choices"]) + "."
    if field.metadata.get("check"):
      extra += f" Must be {field.metadata['check']}."
    rows.append(f"| `--{field.name}` | `{default!r}` | {_cell(field.metadata['help'])}"
                f"{_cell(extra)} |")
  return "\n".join(rows) if len(rows) > 2 else ""


def api_page():
  import corinfomax_tf
  from corinfomax_tf import config
  lines = [
      "# Python API reference",
      "",
      "Generated from the docstrings: every name in `corinfomax_tf.__all__` (importable",
      "as `corinfomax_tf.<name>`), then the configuration classes that the commands'",
      "flags are made of (`corinfomax_tf.config`). The guide to the API is",
      "[Any backbone, and the Python API](backbones-and-api.md).",
      "",
      "## Public names",
      "",
  ]
  for name in corinfomax_tf.__all__:
    module = corinfomax_tf._API[name]
    lines += [f"::: {module}.{name}", "    options:", "      heading_level: 3",
              "      show_if_no_docstring: true", ""]
  lines += ["## Configuration classes", "",
            "Frozen dataclasses built from the flags (`corinfomax_tf.config`). Each",
            "setting is the command-line flag of the same name.", ""]
  for name in CONFIG_CLASSES:
    cls = getattr(config, name)
    lines += [f"::: corinfomax_tf.config.{name}", "    options:", "      heading_level: 3",
              "      members: false", "      show_if_no_docstring: true", ""]
    table = _settings_table(cls)
    if table:
      lines += [table, ""]
  return "\n".join(lines)


def _help(name):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-m", "corinfomax_tf.cli.main", name, "--help"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  if result.returncode != 0 or not result.stdout.startswith("usage:"):
    raise PluginError(f"`corinfomax {name} --help` failed (exit {result.returncode}): "
                      f"{result.stderr.strip()[-500:]}")
  return result.stdout.rstrip("\n")


def commands_page():
  from corinfomax_tf.cli import main
  lines = ["# Command reference", "",
           "Every command's `--help`, as it prints it (this page is generated from it",
           "when the site is built). `corinfomax <command>` and `python -m",
           "corinfomax_tf.<module>` are the same command; `--helpfull` adds absl's own",
           "flags.", "", "    " + main.usage().replace("\n", "\n    ").replace("\n    \n",
                                                                         "\n\n"), ""]
  for name, (module, what) in main.COMMANDS.items():
    lines += [f"## corinfomax {name}", "",
              f"{what[0].upper()}{what[1:]} (`python -m corinfomax_tf.{module}`).", "",
              "```text", _help(name), "```", ""]
  return "\n".join(lines)


GENERATED = {
    "readme.md": lambda: _site_links(_read("README.md")),
    "changelog.md": lambda: _site_links(_read("CHANGELOG.md")),
    "api.md": api_page,
    "commands.md": commands_page,
}


def on_files(files, config):
  for path, make in GENERATED.items():
    if files.get_file_from_path(path) is not None:
      raise PluginError(f"docs/{path} exists, but the site generates it; remove it")
    files.append(File.generated(config, path, content=make()))
  return files


def on_page_markdown(markdown, page, config, files):
  return _site_links(markdown)
