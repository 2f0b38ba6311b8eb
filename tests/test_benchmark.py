"""The benchmark command in a tiny configuration: every JSON field, XLA == no XLA,
one trace over several steps. (Float64 state under mixed precision is tested on the
training command itself, in test_train.py.)"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.cfg")
FIELDS = {"config", "device", "images_per_second", "ms_per_step", "traces", "loss",
          "covariance_dtypes", "xla", "no_xla", "model_flops_per_image_forward",
          "model_flops_per_step", "flops_counting", "achieved_flops_per_second",
          "matmul_flops_per_second", "matmul_size", "mfu_vs_matmul", "peak_memory_bytes",
          "peak_memory_kind", "pipeline", "loss_alone"}


def benchmark(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "-m", "corinfomax_tf.benchmark", f"--flagfile={SMOKE}", "--json",
       "--warmup_steps=1", "--loss_dims=8,16", "--pipeline_batches=2", "--matmul_size=128",
       *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_json_fields_xla_agreement_and_single_trace():
  r = benchmark("--steps=3")
  assert FIELDS <= set(r)
  assert r["traces"] == 1 and r["xla"]["traces"] == 1 and r["no_xla"]["traces"] == 1
  assert r["xla"]["loss"] == pytest.approx(r["no_xla"]["loss"], rel=1e-4)
  assert r["images_per_second"] > 0 and r["ms_per_step"] > 0
  assert r["model_flops_per_image_forward"] > 1e5
  assert r["model_flops_per_step"] == 6 * 16 * r["model_flops_per_image_forward"]
  assert 0 < r["mfu_vs_matmul"] < 10
  assert set(r["loss_alone"]) == {"8", "16"}
  assert r["pipeline"]["images_per_second"] > 0 and r["pipeline"]["cores"] >= 1
  sharded = r["pipeline"]["sharded"]
  assert sharded["workers"] == 2 and sharded["global_images_per_second_one_worker"] > 0
  assert r["covariance_dtypes"] == ["float64"]
