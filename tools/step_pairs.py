r"""The step's pair figure: ours against the authors' PyTorch step, alternated, in rounds.

    /tmp/tv/bin/pip install torch==2.13.0 numpy       # once, see tools/authors_step.py
    python tools/step_pairs.py --torch_python=/tmp/tv/bin/python --rounds=3

Each round runs `python -m corinfomax_tf.benchmark --flagfile=configs/cifar10.cfg`
(CIFAR ResNet-18, projector 2048-2048-64, batch --batch_size; it times our step with and
without XLA in one process) and then `tools/authors_step.py` (the same step in PyTorch)
on the same batch size, one after the other, so that the machine's drift falls on both.
Prints one line per round and the medians; --json writes every figure.
`--fused_batch_norm` also times our step with fused BatchNorm (`--fused_batch_norm` of
the benchmark and of training) in every round, between ours and the authors'.

`--max_isa=AVX2` runs both steps as on a CPU without AVX-512, on a machine that has it:
TensorFlow's oneDNN and PyTorch's (ONEDNN_MAX_CPU_ISA), XLA's code generation
(`--xla_cpu_max_isa`, 256-bit vectors), PyTorch's own kernels (ATEN_CPU_CAPABILITY) and
its MKL (MKL_ENABLE_INSTRUCTIONS) stop at AVX2; TensorFlow's Eigen kernels are built for
AVX either way. The instruction set only: the cores, caches and clock stay this
machine's, so it is no stand-in for another CPU's figures (docs/benchmarks.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The environment that stops each library at an instruction set (--max_isa).
ISA_CAPS = {
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "XLA_FLAGS": "--xla_cpu_max_isa=AVX2 --xla_cpu_prefer_vector_width=256"},
}


def cap_instruction_set(name):
  """Sets this process's environment (inherited by every run) for --max_isa."""
  if name:
    os.environ.update(ISA_CAPS[name])


def last_json(text):
  return json.loads(text.strip().splitlines()[-1])


def ours(batch_size, steps, *flags):
  out = subprocess.run(
      [sys.executable, "-m", "corinfomax_tf.benchmark", "--flagfile=configs/cifar10.cfg",
       f"--batch_size={batch_size}", f"--steps={steps}", "--warmup_steps=1", "--json",
       "--loss_dims=64", "--pipeline_batches=2", "--pipeline_workers=1",
       "--matmul_size=2048", *flags], capture_output=True, text=True, cwd=ROOT, check=True)
  r = last_json(out.stdout)
  return {"no_xla": batch_size * 1000 / r["no_xla"]["ms_per_step"],
          "xla": batch_size * 1000 / r["xla"]["ms_per_step"],
          "mfu_vs_matmul": r["mfu_vs_matmul"], "mfu_vs_peak": r.get("mfu_vs_peak"),
          "cpu_peak": r.get("cpu_peak"), "matmul": r["matmul_flops_per_second"]}


def authors(torch_python, batch_size, steps):
  out = subprocess.run([torch_python, "tools/authors_step.py", f"--batch_size={batch_size}",
                        f"--steps={steps}", "--warmup=1"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
  r = last_json(out.stdout)
  return r["images_per_second"], r.get("cpu_capability")


def round_arguments(rounds):
  """The options every alternated-rounds tool takes (this one, thread_settings.py)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=rounds)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--json", default="")
  parser.add_argument("--max_isa", default="", choices=["", *ISA_CAPS],
                      help="run as on a CPU without AVX-512 (see the module's docstring)")
  return parser


def write_json(path, rows):
  if path:
    with open(path, "w") as fh:
      json.dump(rows, fh, indent=1)


def main():
  parser = round_arguments(3)
  parser.add_argument("--torch_python", default="/tmp/tv/bin/python")
  parser.add_argument("--fused_batch_norm", action="store_true",
                      help="also time our step with --fused_batch_norm in every round")
  args = parser.parse_args()
  cap_instruction_set(args.max_isa)
  rows = []
  for i in range(args.rounds):
    row = ours(args.batch_size, args.steps)
    if args.fused_batch_norm:
      fused = ours(args.batch_size, args.steps, "--fused_batch_norm")
      row["fused_no_xla"], row["fused_xla"] = fused["no_xla"], fused["xla"]
    row["authors"], row["torch_cpu_capability"] = authors(
        args.torch_python, args.batch_size, args.steps)
    row["max_isa"] = args.max_isa or None
    rows.append(row)
    print(f"round {i + 1}: ours {row['no_xla']:.2f} images/s without XLA, {row['xla']:.2f} "
          f"with; authors' {row['authors']:.2f}; XLA/authors "
          f"{row['xla'] / row['authors']:.2f}x, no XLA/authors "
          f"{row['no_xla'] / row['authors']:.2f}x (torch's kernels: "
          f"{row['torch_cpu_capability']})"
          + (f"; fused BatchNorm {row['fused_no_xla']:.2f} without XLA, "
             f"{row['fused_xla']:.2f} with, {row['fused_no_xla'] / row['authors']:.2f}x "
             "the authors'" if args.fused_batch_norm else ""), flush=True)
  keys = ("no_xla", "xla", "authors") + (
      ("fused_no_xla", "fused_xla") if args.fused_batch_norm else ())
  med = {k: statistics.median(r[k] for r in rows) for k in keys}
  print(f"medians: ours {med['no_xla']:.2f} without XLA, {med['xla']:.2f} with; authors' "
        f"{med['authors']:.2f} images/s" + (
            f"; fused BatchNorm {med['fused_no_xla']:.2f} without XLA, "
            f"{med['fused_xla']:.2f} with" if args.fused_batch_norm else ""))
  write_json(args.json, rows)


if __name__ == "__main__":
  main()
