r"""Benchmark of the real training step, the input pipeline and the loss.

    python -m corinfomax_tf.benchmark --flagfile=configs/cifar10.cfg --batch_size=128 \
        --steps=5 [--jit] [--mixed_precision=bfloat16] [--json]
    python -m corinfomax_tf.benchmark --flagfile=configs/imagenet1k.cfg --input_only [--json]

--input_only times the input pipeline alone at the config's image size and
augmentation, on an ImageNet-like folder of JPEGs generated once in a temporary
folder: plain read + decode against the full two-view pipeline, images/s per core
(library: corinfomax_tf/benchmarking/input_pipeline.py).

Measured in one run, on one machine:
  * the training step of the real model (two views, encoder, projector, loss,
    optimizer update) on a fixed batch already in memory, after warm-up, with and
    without XLA: images/s, ms/step, peak memory, and the achieved FLOP/s as a share
    of a dense matrix product in the step's compute dtype (float32, or bfloat16 /
    float16 under mixed precision) timed on the same machine (model FLOPs counted
    from the graph: the forward pass of encoder + projector for one image, by
    TensorFlow's graph profiler, times 3 for forward + backward, times 2 views);
  * the input pipeline alone (two augmented views per image), images/s in all and per
    core, and the rate at which one of --pipeline_workers workers feeds its part of
    each global batch (each worker decodes and augments only its own images);
  * the loss alone (covariance updates + two log-determinants, forward and backward)
    for several D, as a share of the step;
  * the number of traces of the step function (1 means no retracing).
"""

import json

from absl import flags

from corinfomax_tf import config as config_lib
from corinfomax_tf import errors
from corinfomax_tf import flags as flags_lib
from corinfomax_tf.cli import runner


def define_flags():
  flags_lib.define_flags()
  flags.DEFINE_integer("steps", 5, "Timed training steps (after warm-up).")
  flags.DEFINE_integer("warmup_steps", 2, "Untimed steps first (tracing, autotuning).")
  flags.DEFINE_bool("jit", False, "Headline figures with XLA (both are always timed).")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  flags.DEFINE_list("loss_dims", ["64", "128", "512", "1024", "2048"],
                    "Projector dimensions D at which the loss alone is timed.")
  flags.DEFINE_integer("pipeline_batches", 10, "Batches timed for the input pipeline.")
  flags.DEFINE_integer("pipeline_workers", 2,
                       "Also time one worker's input pipeline when this many workers "
                       "share each global batch (1: skip).")
  flags.DEFINE_integer("matmul_size", 4096, "Size n of the n x n reference matmul.")
  flags.DEFINE_bool("input_only", False,
                    "Time only the input pipeline, against plain JPEG decoding, on a "
                    "generated ImageNet-like folder.")
  flags.DEFINE_integer("input_images", 256,
                       "--input_only: JPEGs in the generated folder (made once in the "
                       "temporary folder, then reused).")
  flags.DEFINE_integer("input_batch_size", 64, "--input_only: batch size of both pipelines.")
  flags.DEFINE_bool("runtimes_only", False,
                    "Encoder images/s of ONNX Runtime against the SavedModel (ResNet-18 at "
                    "32 px, ResNet-50 at 224 px, batch --input_batch_size), nothing else.")
  flags.DEFINE_integer("runtime_rounds", 5, "--runtimes_only: timed rounds of each.")


def format_table(r):
  lines = [
      f"device: {r['device']}  config: {r['config']}",
      f"training step: {r['ms_per_step']:.1f} ms/step, {r['images_per_second']:.1f} images/s "
      f"(XLA {r['xla']['ms_per_step']:.1f} ms, no XLA {r['no_xla']['ms_per_step']:.1f} ms)",
      f"traces of the step function: {r['traces']}",
      f"model FLOPs: {r['model_flops_per_image_forward'] / 1e9:.3f} GFLOP forward per image; "
      f"{r['model_flops_per_step'] / 1e9:.1f} GFLOP per step",
      f"achieved {r['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s; dense {r['matmul_dtype']} matmul "
      f"({r['matmul_size']}^3) {r['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s; "
      f"utilisation {100 * r['mfu_vs_matmul']:.1f}%",
      (f"CPU peak (float32, as detected: {r['cpu_peak']['cores']} cores x "
       f"{r['cpu_peak']['fma_units_per_core']} FMA units x {r['cpu_peak']['float32_lanes']} "
       f"lanes ({r['cpu_peak']['vector']}) x 2 x {r['cpu_peak']['clock_ghz']:.2f} GHz) "
       f"{r['cpu_peak']['flops_per_second'] / 1e9:.1f} GFLOP/s; utilisation "
       f"{100 * r['mfu_vs_peak']:.1f}%; the matmul reaches "
       f"{100 * r['matmul_flops_per_second'] / r['cpu_peak']['flops_per_second']:.1f}% of it"
       + ("; above 100%: the detected peak is too low (a virtual machine's cpu MHz is "
          "its base clock, not its boost, or the core has more FMA units than assumed)"
          if r['matmul_flops_per_second'] > r['cpu_peak']['flops_per_second'] else ""))
      if r.get("cpu_peak") else "CPU peak: not detected (no /proc/cpuinfo clock, or not "
      "a float32 step on the CPU)",
      f"peak memory: {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})",
      "settings: " + (", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items()))
                      or "TensorFlow's defaults (no thread, oneDNN or XLA variable set)"),
      f"input pipeline: {r['pipeline']['images_per_second']:.1f} images/s "
      f"({r['pipeline']['images_per_second_per_core']:.1f} per core, "
      f"{r['pipeline']['ratio_to_step']:.2f}x the step)",
  ]
  sharded = r["pipeline"].get("sharded")
  if sharded:
    lines.append(f"input pipeline of one of {sharded['workers']} workers: "
                 f"{sharded['global_images_per_second_one_worker']:.1f} global images/s, "
                 f"{sharded['speedup_vs_whole']:.2f}x the whole pipeline")
  for dim, v in r["loss_alone"].items():
    lines.append(f"loss alone at D={dim}: {v['ms']:.2f} ms, "
                 f"{100 * v['share_of_step']:.2f}% of the step")
  return "\n".join(lines)


def format_input_only(r):
  return "\n".join([
      f"input only, {r['image_size']} px, {r['cores']} cores, {r['folder_images']} "
      f"ImageNet-like JPEGs in {r['folder']}",
      f"plain read + decode: {r['jpeg_decode_images_per_s']:.1f} images/s "
      f"({r['jpeg_decode_images_per_s_per_core']:.1f} per core; "
      f"{r['jpeg_decode_images_per_cpu_s']:.1f} per CPU second)",
      f"two views per image: {r['imagenet_like_images_per_s']:.1f} images/s "
      f"({r['imagenet_like_images_per_s_per_core']:.1f} per core; "
      f"{r['imagenet_like_images_per_cpu_s']:.1f} per CPU second), "
      f"{r['ratio_to_decode']:.2f} of the decode rate"])


def format_runtimes(rows):
  return "\n".join(
      f"{r['encoder']} at {r['image_size']} px, batch {r['batch_size']}: SavedModel "
      f"{r['savedmodel_images_per_s']:.1f} images/s, ONNX Runtime "
      f"{r['onnxruntime_images_per_s']:.1f} images/s ({r['onnx_over_savedmodel']:.2f}x; "
      f"features equal to {r['relative_difference']:.1g})" for r in rows)


def main(flag_values):
  f = flag_values
  cfg = config_lib.from_flags(f)
  runner.start_tensorflow()
  if f.runtimes_only:
    from corinfomax_tf.benchmarking import runtimes
    if f.input_batch_size < 1 or f.runtime_rounds < 1:
      raise errors.ConfigError("--input_batch_size, --runtime_rounds: must be >= 1")
    rows = runtimes.time_runtimes(batch_size=f.input_batch_size, rounds=f.runtime_rounds)
    print(json.dumps({"runtimes": rows}, sort_keys=True) if f.json else
          format_runtimes(rows), flush=True)
    return
  if f.input_only:
    from corinfomax_tf.benchmarking import input_pipeline
    for name in ("input_images", "input_batch_size", "pipeline_batches"):
      if f[name].value < 1:
        raise errors.ConfigError(f"--{name}={f[name].value}: must be >= 1")
    result = input_pipeline.time_input_only(cfg, batch_size=f.input_batch_size,
                                            batches=f.pipeline_batches,
                                            images=f.input_images)
    print(json.dumps(result, sort_keys=True) if f.json else format_input_only(result),
          flush=True)
    return
  try:
    dims = [int(d) for d in f.loss_dims]
  except ValueError:
    raise errors.ConfigError(f"--loss_dims={','.join(f.loss_dims)}: must be integers") from None
  if f.steps < 1 or f.warmup_steps < 1:
    raise errors.ConfigError(f"--steps={f.steps}, --warmup_steps={f.warmup_steps}: "
                             "must be >= 1")
  if f.pipeline_workers < 1 or cfg.train.batch_size % f.pipeline_workers:
    raise errors.ConfigError(f"--pipeline_workers={f.pipeline_workers}: must be >= 1 "
                             f"and divide --batch_size={cfg.train.batch_size}")
  if cfg.train.mixed_precision != "none":
    import keras
    keras.mixed_precision.set_global_policy(f"mixed_{cfg.train.mixed_precision}")
  from corinfomax_tf.benchmarking import training_step
  result = training_step.run_benchmark(
      cfg, batch_size=cfg.train.batch_size, steps=f.steps, warmup=f.warmup_steps,
      jit=f.jit, loss_dims=dims, pipeline_batches=f.pipeline_batches,
      matmul_size=f.matmul_size, pipeline_workers=f.pipeline_workers)
  print(json.dumps(result, sort_keys=True) if f.json else format_table(result),
        flush=True)


def run():
  runner.run(main, define_flags, quiet_level="error")
