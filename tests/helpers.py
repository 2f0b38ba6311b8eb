"""Shared test helpers: generated image folders and tiny configs."""

import os

import numpy as np
from PIL import Image


def write_image_folder(root, classes=3, per_class=6, size=(20, 24), splits=("train", "test"),
                       seed=0):
  """root/<split>/<class>/<i>.png with per-class colour so classes are separable."""
  rs = np.random.RandomState(seed)
  for split in splits:
    for c in range(classes):
      folder = os.path.join(root, split, f"class_{c}")
      os.makedirs(folder, exist_ok=True)
      for i in range(per_class):
        base = np.zeros(size + (3,))
        base[..., c % 3] = 0.8
        pixels = np.clip(base + 0.2 * rs.rand(*size, 3), 0, 1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i}.png"))
  return root


def assert_one_line_errors(module, common, cases, env, cwd):
  """Runs `python -m module *common *args` for every (args, needle) case at once
  (bad input stops before training, so they are cheap together) and asserts exit
  status 2, `needle` in the last stderr line, and no traceback."""
  import subprocess
  import sys
  procs = [(subprocess.Popen([sys.executable, "-m", module, *common, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=cwd), needle) for args, needle in cases]
  for proc, needle in procs:
    _, err = proc.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and needle in last, err[-2000:]
    assert "Traceback" not in err
