"""Shared test helpers: generated image folders and tiny configs."""

import os

import numpy as np
from PIL import Image

from tests import forkserver

# Commands run as forks of a process that has imported TensorFlow once
# (tests/forkserver.py); the same signatures as subprocess's.
popen = forkserver.popen
run = forkserver.run


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
  procs = [(popen([sys.executable, "-m", module, *common, *args], stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True, env=env, cwd=cwd), needle)
           for args, needle in cases]
  for proc, needle in procs:
    _, err = proc.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and needle in last, err[-2000:]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------
# Commands in subprocesses.
# ----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.cfg")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def run_command(module, *args, timeout=300):
  """`python -m <module> *args` from the repository root; the CompletedProcess."""
  import sys
  return run([sys.executable, "-m", module, *args], capture_output=True, text=True,
             timeout=timeout, env=ENV, cwd=ROOT)


def start_command(module, *args):
  """`python -m <module> *args` started in the background; the Popen."""
  import subprocess
  import sys
  return popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def checkpoint_numbers(workdir):
  import glob
  return sorted(int(p.rsplit("-", 1)[1].split(".")[0])
                for p in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")))


def kill_after_first_checkpoint(proc, workdir, timeout=240):
  """SIGKILLs `proc` as soon as its first checkpoint exists; the checkpoints left."""
  import signal
  import time
  deadline = time.time() + timeout
  while not checkpoint_numbers(workdir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  return checkpoint_numbers(workdir)


def checkpoint_state(workdir):
  """Every saved tensor of a workdir's latest checkpoint (weights, optimizer, step)."""
  import tensorflow as tf
  reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith("_CHECKPOINTABLE") and "save_counter" not in k}


def assert_same_state(workdir, reference):
  """The latest checkpoint of `workdir` equals `reference` (checkpoint_state), bitwise."""
  state = checkpoint_state(workdir)
  assert set(state) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)


def write_image_tree(root, count=24, size=(20, 24), seed=0):
  """Unlabeled images in nested folders, JPEG and PNG mixed, plus a text file that
  is not an image: a user's photo collection in miniature."""
  rs = np.random.RandomState(seed)
  for i in range(count):
    folder = os.path.join(root, f"trip_{i % 3}", "day_1" if i % 2 else "")
    os.makedirs(folder, exist_ok=True)
    base = np.zeros(size + (3,))
    base[..., i % 3] = 0.8
    pixels = (np.clip(base + 0.2 * rs.rand(*size, 3), 0, 1) * 255).astype(np.uint8)
    ext = "jpg" if i % 2 else "png"
    Image.fromarray(pixels).save(os.path.join(folder, f"photo_{i}.{ext}"))
  with open(os.path.join(root, "trip_0", "notes.txt"), "w") as fh:
    fh.write("not an image\n")
  return root


def free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny_backbone(kind, image_size=8):
  """A tiny keras-hub backbone built from its constructor (no download): a 2-layer
  ViT (token sequence with a class token) or a 2-block MobileNet (feature map)."""
  import keras_hub
  if kind == "vit":
    return keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, 3), patch_size=4, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32)
  return keras_hub.models.MobileNetBackbone(
      stackwise_expansion=[[1], [4]], stackwise_num_blocks=[1, 1],
      stackwise_num_filters=[[8], [16]], stackwise_kernel_size=[[3], [3]],
      stackwise_num_strides=[[2], [2]], stackwise_se_ratio=[[None], [0.25]],
      stackwise_activation=[["relu"], ["hard_swish"]], stackwise_padding=[[1], [1]],
      output_num_filters=32, depthwise_filters=8, depthwise_stride=1,
      depthwise_residual=False, last_layer_filter=32,
      image_shape=(image_size, image_size, 3), input_num_filters=8)


def write_backbone_config(path, kind, image_size=8):
  """The JSON `keras.saving.serialize_keras_object` writes for a tiny backbone (what
  --backbone_config reads); returns the path."""
  import json

  import keras
  with open(path, "w") as fh:
    json.dump(keras.saving.serialize_keras_object(tiny_backbone(kind, image_size)), fh)
  return str(path)


def shared_once(tmp_path_factory, name, make):
  """`make(folder)` run once for the whole test run: under pytest-xdist the first
  worker to ask makes it in a folder every worker sees (the run's base temporary
  folder) while the others wait on a lock, and all return what it returned (JSON).
  A failure is raised again in every worker that asks."""
  import fcntl
  import json

  import pytest
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    return make(str(tmp_path_factory.mktemp(name)))
  base = tmp_path_factory.getbasetemp().parent
  folder, done = base / name, base / f"{name}.json"
  with open(base / f"{name}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      try:
        folder.mkdir()
        answer = {"value": make(str(folder))}
      except BaseException as exc:   # noqa: B036 (recorded, then raised)
        answer = {"error": f"{type(exc).__name__}: {exc}"}
        done.write_text(json.dumps(answer))
        raise
      done.write_text(json.dumps(answer))
  answer = json.loads(done.read_text())
  if "error" in answer:
    pytest.fail(f"the shared fixture {name} failed in another worker: {answer['error']}")
  return answer["value"]
