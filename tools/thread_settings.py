r"""The training step under TensorFlow's thread and oneDNN settings, alternated in rounds.

    python tools/thread_settings.py --rounds=2

Each round runs the benchmark's step (`python -m corinfomax_tf.benchmark
--flagfile=configs/cifar10.cfg`, CIFAR ResNet-18, batch --batch_size, with and without
XLA in one process) once per setting, one after the other, so that the machine's drift
falls on every setting alike. The settings are environment variables TensorFlow reads
at start-up: TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS (0 or unset: one thread
per core for each pool) and TF_ENABLE_ONEDNN_OPTS (oneDNN's kernels for convolutions,
matmuls and their fusions; on by default on x86). Prints one line per run and each
setting's median images/s; --json writes every figure; --max_isa=AVX2 runs every
setting as on a CPU without AVX-512 (tools/step_pairs.py).
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_pairs  # noqa: E402  (tools/step_pairs.py: the same benchmark call)

SETTINGS = {
    "default": {},
    "intra_op=1": {"TF_NUM_INTRAOP_THREADS": "1"},
    "inter_op=1": {"TF_NUM_INTEROP_THREADS": "1"},
    "intra_op=cores, inter_op=1": {"TF_NUM_INTRAOP_THREADS": str(os.cpu_count()),
                                   "TF_NUM_INTEROP_THREADS": "1"},
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
}


def main():
  args = step_pairs.round_arguments(2).parse_args()
  step_pairs.cap_instruction_set(args.max_isa)
  rows = {name: [] for name in SETTINGS}
  saved = dict(os.environ)
  for i in range(args.rounds):
    for name, env in SETTINGS.items():
      os.environ.clear()
      os.environ.update(saved)
      os.environ.update(env)
      row = step_pairs.ours(args.batch_size, args.steps)
      rows[name].append(row)
      print(f"round {i + 1} {name:<28} {row['no_xla']:6.2f} images/s without XLA, "
            f"{row['xla']:6.2f} with", flush=True)
  os.environ.clear()
  os.environ.update(saved)
  print(f"medians over {args.rounds} rounds, {os.cpu_count()} cores:")
  for name, runs in rows.items():
    print(f"  {name:<28} {statistics.median(r['no_xla'] for r in runs):6.2f} without XLA, "
          f"{statistics.median(r['xla'] for r in runs):6.2f} with")
  step_pairs.write_json(args.json, rows)


if __name__ == "__main__":
  main()
