"""Files written whole or not at all: a reader never sees half of one."""

import json
import os


def write_atomic(path, text):
  """Writes `text` to path.tmp, then renames it over `path` (atomic on POSIX)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as fh:
    fh.write(text)
  os.replace(tmp, path)


def write_json_atomic(path, value, **dump_kwargs):
  write_atomic(path, json.dumps(value, **dump_kwargs))
