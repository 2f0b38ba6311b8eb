"""The benchmark command in a tiny configuration: every JSON field, XLA == no XLA,
one trace over several steps. (Float64 state under mixed precision is tested on the
training command itself, in test_train.py.)"""

import json
import os
import sys

import pytest

from tests import helpers

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.cfg")
FIELDS = {"config", "device", "images_per_second", "ms_per_step", "traces", "loss",
          "covariance_dtypes", "xla", "no_xla", "model_flops_per_image_forward",
          "model_flops_per_step", "flops_counting", "achieved_flops_per_second",
          "matmul_flops_per_second", "matmul_size", "mfu_vs_matmul", "peak_memory_bytes",
          "peak_memory_kind", "pipeline", "loss_alone", "matmul_dtype", "cpu_peak",
          "mfu_vs_peak", "settings"}


def benchmark(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  result = helpers.run(
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
  if r["cpu_peak"] is not None:   # Linux x86: the float32 peak as detected
    peak = r["cpu_peak"]
    assert peak["flops_per_second"] == pytest.approx(
        peak["cores"] * peak["fma_units_per_core"] * peak["float32_lanes"] * 2
        * peak["clock_ghz"] * 1e9)
    assert r["mfu_vs_peak"] == pytest.approx(r["achieved_flops_per_second"]
                                             / peak["flops_per_second"])
  assert set(r["loss_alone"]) == {"8", "16"}
  assert r["pipeline"]["images_per_second"] > 0 and r["pipeline"]["cores"] >= 1
  sharded = r["pipeline"]["sharded"]
  assert sharded["workers"] == 2 and sharded["global_images_per_second_one_worker"] > 0
  assert r["covariance_dtypes"] == ["float64"]
  assert r["matmul_dtype"] == "float32"
  # The start-up settings it ran with, e.g. the workers' thread shares (conftest.py).
  assert r["settings"].get("TF_NUM_INTRAOP_THREADS") == os.environ.get(
      "TF_NUM_INTRAOP_THREADS")


def test_speed_settings_are_the_start_up_variables_that_are_set():
  from corinfomax_tf.benchmarking import training_step
  environ = {"ONEDNN_MAX_CPU_ISA": "AVX2", "TF_NUM_INTEROP_THREADS": "", "HOME": "/x",
             "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}
  assert training_step.speed_settings(environ) == {
      "ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}


CPUINFO = """processor	: 0
vendor_id	: {vendor}
model name	: {name}
cpu MHz		: 2500.000
flags		: fpu sse sse2 {flags}
"""


@pytest.mark.parametrize("vendor,name,flags,lanes,units", [
    ("AuthenticAMD", "AMD EPYC 7B13", "avx fma avx2", 8, 2),
    ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8481C", "avx fma avx2 avx512f", 16, 2),
    ("AuthenticAMD", "AMD EPYC 9B14", "avx fma avx2 avx512f", 16, 1),
    ("GenuineIntel", "Intel(R) Core(TM) 2", "", 4, 2)])
def test_cpu_peak_is_cores_fma_units_lanes_2_and_the_clock(tmp_path, vendor, name, flags,
                                                          lanes, units):
  from corinfomax_tf.benchmarking import training_step
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO.format(vendor=vendor, name=name, flags=flags))
  peak = training_step.cpu_peak(str(path), cores=2, max_isa="")
  assert (peak["float32_lanes"], peak["fma_units_per_core"]) == (lanes, units)
  assert peak["flops_per_second"] == pytest.approx(2 * units * lanes * 2 * 2.5e9)
  assert peak["cpu"] == name
  assert training_step.cpu_peak(str(tmp_path / "missing")) is None
  # oneDNN capped at AVX2 (tools/step_pairs.py --max_isa=AVX2): 8 lanes at most.
  capped = training_step.cpu_peak(str(path), cores=2, max_isa="AVX2")
  assert capped["float32_lanes"] == min(lanes, 8)
  assert training_step.cpu_peak(str(path), cores=2, max_isa="SSE41")["float32_lanes"] == 4


def test_utilisation_is_measured_against_a_matmul_in_the_steps_compute_dtype():
  from corinfomax_tf.benchmarking import training_step
  assert [training_step.matmul_dtype(m) for m in ("none", "bfloat16", "float16")] == [
      "float32", "bfloat16", "float16"]
  assert training_step.matmul_flops_per_second(64, repeats=1, rounds=1,
                                               dtype="bfloat16") > 0


def test_input_only_times_decode_and_the_two_view_pipeline(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(tmp_path))
  args = [sys.executable, "-m", "corinfomax_tf.benchmark", f"--flagfile={SMOKE}",
          "--input_only", "--json", "--input_images=6", "--input_batch_size=4",
          "--pipeline_batches=2"]
  runs = []
  for _ in range(2):   # the second run reuses the generated folder
    result = helpers.run(args, capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
  r = runs[0]
  assert r["jpeg_decode_images_per_s_per_core"] > 0
  assert r["imagenet_like_images_per_s_per_core"] > 0
  assert r["jpeg_decode_images_per_cpu_s"] > 0 and r["imagenet_like_images_per_cpu_s"] > 0
  assert len(r["imagenet_like_images_per_s_per_core_per_round"]) == r["rounds"]
  ratios = r["ratio_to_decode_per_round"]
  assert len(ratios) == r["rounds"] and min(ratios) <= r["ratio_to_decode"] <= max(ratios)
  assert r["folder_images"] == 6 and r["folder"].startswith(str(tmp_path))
  jpegs = sorted(p for p in os.listdir(r["folder"]) if p.endswith(".jpg"))
  assert len(jpegs) == 6 and runs[1]["folder"] == r["folder"]
  from PIL import Image
  with Image.open(os.path.join(r["folder"], jpegs[0])) as im:
    assert im.format == "JPEG" and min(im.size) >= 300


def test_wide_cpu_vectors_are_asked_of_xla_only_on_avx512_and_never_over_the_users(
    tmp_path, monkeypatch):
  from corinfomax_tf.cli import runner
  avx512, avx2 = tmp_path / "avx512", tmp_path / "avx2"
  avx512.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
  avx2.write_text("flags\t\t: fpu sse avx2 fma\n")
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  runner.prefer_wide_cpu_vectors(str(avx512))
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_prefer_vector_width=512"
  runner.prefer_wide_cpu_vectors(str(avx512))     # once only
  assert os.environ["XLA_FLAGS"].count("prefer_vector_width") == 1
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
  runner.prefer_wide_cpu_vectors(str(avx512))
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=256"
  monkeypatch.delenv("XLA_FLAGS")
  runner.prefer_wide_cpu_vectors(str(avx2))
  runner.prefer_wide_cpu_vectors(str(tmp_path / "missing"))
  assert "XLA_FLAGS" not in os.environ
