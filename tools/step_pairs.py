r"""The step's pair figure: ours against the authors' PyTorch step, alternated, in rounds.

    /tmp/tv/bin/pip install torch==2.13.0 numpy       # once, see tools/authors_step.py
    python tools/step_pairs.py --torch_python=/tmp/tv/bin/python --rounds=3

Each round runs `python -m corinfomax_tf.benchmark --flagfile=configs/cifar10.cfg`
(CIFAR ResNet-18, projector 2048-2048-64, batch --batch_size; it times our step with and
without XLA in one process) and then `tools/authors_step.py` (the same step in PyTorch)
on the same batch size, one after the other, so that the machine's drift falls on both.
Prints one line per round and the medians; --json writes every figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json(text):
  return json.loads(text.strip().splitlines()[-1])


def ours(batch_size, steps):
  out = subprocess.run(
      [sys.executable, "-m", "corinfomax_tf.benchmark", "--flagfile=configs/cifar10.cfg",
       f"--batch_size={batch_size}", f"--steps={steps}", "--warmup_steps=1", "--json",
       "--loss_dims=64", "--pipeline_batches=2", "--pipeline_workers=1",
       "--matmul_size=2048"], capture_output=True, text=True, cwd=ROOT, check=True)
  r = last_json(out.stdout)
  return {"no_xla": batch_size * 1000 / r["no_xla"]["ms_per_step"],
          "xla": batch_size * 1000 / r["xla"]["ms_per_step"],
          "mfu_vs_matmul": r["mfu_vs_matmul"], "mfu_vs_peak": r.get("mfu_vs_peak"),
          "cpu_peak": r.get("cpu_peak"), "matmul": r["matmul_flops_per_second"]}


def authors(torch_python, batch_size, steps):
  out = subprocess.run([torch_python, "tools/authors_step.py", f"--batch_size={batch_size}",
                        f"--steps={steps}", "--warmup=1"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
  return last_json(out.stdout)["images_per_second"]


def round_arguments(rounds):
  """The options every alternated-rounds tool takes (this one, thread_settings.py)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=rounds)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--json", default="")
  return parser


def write_json(path, rows):
  if path:
    with open(path, "w") as fh:
      json.dump(rows, fh, indent=1)


def main():
  parser = round_arguments(3)
  parser.add_argument("--torch_python", default="/tmp/tv/bin/python")
  args = parser.parse_args()
  rows = []
  for i in range(args.rounds):
    row = ours(args.batch_size, args.steps)
    row["authors"] = authors(args.torch_python, args.batch_size, args.steps)
    rows.append(row)
    print(f"round {i + 1}: ours {row['no_xla']:.2f} images/s without XLA, {row['xla']:.2f} "
          f"with; authors' {row['authors']:.2f}; XLA/authors "
          f"{row['xla'] / row['authors']:.2f}x, no XLA/authors "
          f"{row['no_xla'] / row['authors']:.2f}x", flush=True)
  med = {k: statistics.median(r[k] for r in rows) for k in ("no_xla", "xla", "authors")}
  print(f"medians: ours {med['no_xla']:.2f} without XLA, {med['xla']:.2f} with; authors' "
        f"{med['authors']:.2f} images/s")
  write_json(args.json, rows)


if __name__ == "__main__":
  main()
