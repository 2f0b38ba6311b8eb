r"""Where the training step's time goes: op types by self-time, from TensorFlow's profiler.

    python tools/step_profile.py [--batch_size=128] [--jit] [--top=25] [--json=FILE]

Builds the benchmark's step (`configs/cifar10.cfg`: CIFAR ResNet-18, projector
2048-2048-64, the CorInfoMax loss, the reference SGD; `benchmarking.training_step`), runs
two warm-up steps, profiles one more with `tf.profiler` and reads the profile's
framework op statistics (the profiler's own converter, `xspace_to_tools_data`, as
TensorBoard's profile plugin does). Prints each op type's self-time and share, summed
over the threads that ran it (with two inter-op threads the sum exceeds the step's
wall time), and the longest single ops. Runs under whatever start-up settings the
environment holds (ONEDNN_MAX_CPU_ISA, TF_NUM_*_THREADS; see tools/step_pairs.py).
"""

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # before TensorFlow starts

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin  # noqa: E402

from corinfomax_tf import config as config_lib  # noqa: E402
from corinfomax_tf.benchmarking import training_step  # noqa: E402
from corinfomax_tf.cli import benchmark  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def op_rows(profile_dir):
  """The profile's framework op table as a list of {column: value}."""
  paths = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
  data, ok = plugin.xspace_to_tools_data(paths, "framework_op_stats", {})
  if not ok:
    raise SystemExit(f"the profiler wrote nothing readable under {profile_dir}")
  table = json.loads(data)
  table = table[0] if isinstance(table, list) else table
  cols = [c["id"] for c in table["cols"]]
  return [dict(zip(cols, [c.get("v") if c else None for c in row["c"]]))
          for row in table["rows"]]


def build_step(batch_size, jit):
  """(step function, its inputs) of the benchmark's model, on a random batch."""
  benchmark.define_flags()
  flags.FLAGS([sys.argv[0], f"--flagfile={ROOT}/configs/cifar10.cfg",
               f"--batch_size={batch_size}"])
  cfg = config_lib.from_flags(flags.FLAGS)
  run = training_step.time_train_step(cfg, batch_size, 1, 1, jit)   # builds and warms
  model = run["model"]
  rs = np.random.RandomState(0)
  size = cfg.data.image_size
  views = tf.constant(rs.randn(batch_size, 2, size, size, 3).astype(np.float32))
  labels = tf.zeros([batch_size], tf.int64)
  step = tf.function(lambda v, l: model.train_step((v, l)), jit_compile=jit)
  float(step(views, labels)["loss"])
  return step, (views, labels)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--jit", action="store_true", help="the XLA-compiled step")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  step, inputs = build_step(args.batch_size, args.jit)
  float(step(*inputs)["loss"])
  with tempfile.TemporaryDirectory() as folder:
    tf.profiler.experimental.start(folder)
    start = time.perf_counter()
    float(step(*inputs)["loss"])
    wall = time.perf_counter() - start
    tf.profiler.experimental.stop()
    rows = op_rows(folder)
  by_type, count = collections.Counter(), collections.Counter()
  for r in rows:
    by_type[r["type"]] += r["total_self_time"]
    count[r["type"]] += r["occurrences"]
  total = sum(by_type.values())
  print(f"one step: {wall * 1000:.0f} ms wall (profiled), {total / 1000:.0f} ms of op "
        f"self-time summed over threads")
  for name, us in by_type.most_common(args.top):
    print(f"  {name:36s} {us / 1000:8.1f} ms {100 * us / total:5.1f}%  "
          f"({count[name]:.0f} ops)")
  print("longest single ops:")
  for r in sorted(rows, key=lambda r: -r["total_self_time"])[:10]:
    print(f"  {r['type']:32s} {r['total_self_time'] / 1000:7.1f} ms  {r['operation']}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"wall_ms": wall * 1000, "by_type_us": dict(by_type), "rows": rows}, fh,
                indent=1)


if __name__ == "__main__":
  main()
