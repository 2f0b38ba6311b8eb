r"""Benchmark of the real training step, the input pipeline and the loss.

    python -m corinfomax_tf.benchmark --flagfile=configs/cifar10.cfg --batch_size=128 \
        --steps=5 [--jit] [--mixed_precision=bfloat16] [--json]

Measured in one run, on one machine:
  * the training step of the real model (two views, encoder, projector, loss,
    optimizer update) on a fixed batch already in memory, after warm-up, with and
    without XLA: images/s, ms/step, peak memory, and the achieved FLOP/s as a share
    of a dense float32 matrix product timed on the same machine (model FLOPs counted
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
import os
import resource
import time

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
  flags.DEFINE_integer("matmul_size", 4096, "Size n of the n x n float32 reference matmul.")


def peak_memory():
  """(bytes, what): GPU peak when a GPU is used, else the process's peak RSS."""
  import tensorflow as tf
  if tf.config.list_physical_devices("GPU"):
    return tf.config.experimental.get_memory_info("GPU:0")["peak"], "gpu_peak_bytes"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss_bytes"


def matmul_flops_per_second(n, repeats=5, rounds=3):
  """Best of `rounds` timings of `repeats` float32 n x n matmuls: the machine's
  attainable dense rate, the denominator of the utilisation."""
  import tensorflow as tf
  a = tf.random.normal((n, n))
  b = tf.random.normal((n, n))
  fn = tf.function(lambda a, b: tf.matmul(a, b))
  fn(a, b).numpy()
  best = 0.0
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn(a, b)
    out.numpy()
    best = max(best, 2.0 * n**3 * repeats / (time.perf_counter() - start))
  return best


def forward_flops_per_image(model, image_size):
  """FLOPs of encoder + projector forward for one image, from the graph."""
  import tensorflow as tf
  from tensorflow.python.profiler import model_analyzer
  from tensorflow.python.profiler import option_builder

  @tf.autograph.experimental.do_not_convert
  def forward(x):
    return model.projector(model.features(x, training=False), training=False)
  graph = tf.function(forward).get_concrete_function(
      tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
  options = option_builder.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  return int(model_analyzer.profile(graph, options=options).total_float_ops)


def time_train_step(cfg, batch_size, steps, warmup, jit):
  """Builds the real model and times its train_step on a fixed batch."""
  import keras
  import numpy as np
  import tensorflow as tf

  from corinfomax_tf.training import schedules
  from corinfomax_tf.method import model as ssl_model
  keras.utils.set_random_seed(cfg.train.seed)
  model = ssl_model.build_pretraining_model(cfg.model, cfg.loss)
  optimizer = schedules.ReferenceSGD(cfg.optim.lr, momentum=cfg.optim.momentum,
                                     l2_weight_decay=cfg.optim.weight_decay)
  if cfg.train.mixed_precision == "float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  model.compile(optimizer=optimizer)
  optimizer.build(model.pretraining_variables)
  size = cfg.data.image_size
  rs = np.random.RandomState(0)
  views = tf.constant(rs.randn(batch_size, 2, size, size, 3).astype(np.float32))
  labels = tf.constant(np.zeros(batch_size, np.int64))
  traces = []

  def step(views, labels):
    traces.append(1)          # Python side effect: runs once per trace
    return model.train_step((views, labels))
  step_fn = tf.function(step, jit_compile=jit)
  for _ in range(warmup):
    logs = step_fn(views, labels)
  float(logs["loss"])
  start = time.perf_counter()
  for _ in range(steps):
    logs = step_fn(views, labels)
  float(logs["loss"])          # one host sync at the end: no round trips per step
  seconds = (time.perf_counter() - start) / steps
  return {"seconds_per_step": seconds, "images_per_second": batch_size / seconds,
          "traces": len(traces), "loss": float(logs["loss"]), "model": model,
          "covariance_dtypes": sorted({v.dtype for v in model.loss_layer.weights})}


def synthetic_source(image_size, count=4096):
  """Random uint8 images of the training size, for when the data set is absent."""
  import numpy as np
  import tensorflow as tf

  from corinfomax_tf.data import datasets as data_lib
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (count, image_size, image_size, 3)).astype(np.uint8)
  labels = np.zeros(count, np.int64)
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  return data_lib.Source("synthetic", ds, ds, count, count, 1, in_memory=True)


def time_pipeline(cfg, batch_size, batches, workers=1):
  """Input pipeline rates, in global-batch images per second: the whole pipeline,
  and (workers > 1) worker 0's pipeline when `workers` workers share each global
  batch, i.e. how fast one worker feeds its part. The source is loaded as training
  loads it (an image folder is decoded per step unless --cache)."""
  import tensorflow as tf

  from corinfomax_tf.data import datasets as data_lib
  d = cfg.data
  try:
    source = data_lib.load_source(d.dataset, **{**d.source_kwargs(), "tfds_download": False})
  except errors.DataError:
    # Decoded, cached images cost the same to augment whatever their content.
    source = synthetic_source(d.image_size)

  def rate(context):
    ds = data_lib.two_view_dataset(source, global_batch_size=batch_size,
                                   image_size=d.image_size,
                                   views=(cfg.augment.view1, cfg.augment.view2),
                                   mean=d.mean, std=d.std, seed=0, input_context=context)
    it = iter(ds)
    next(it)                   # start-up and cache fill are not timed
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch_size / (time.perf_counter() - start)

  whole = rate(None)
  cores = os.cpu_count() or 1
  result = {"images_per_second": whole, "images_per_second_per_core": whole / cores,
            "cores": cores, "source": source.name,
            "decoded_per_step": source.streams_encoded}
  if workers > 1:
    # Worker 0 of `workers`, one replica each: per-replica batches of B / workers.
    one = rate(tf.distribute.InputContext(workers, 0, workers))
    result["sharded"] = {"workers": workers, "global_images_per_second_one_worker": one,
                         "speedup_vs_whole": one / whole}
  return result


def time_loss(dim, batch_size, repeats=5):
  """Covariance updates + two log-determinants, forward and backward, at D = dim."""
  import numpy as np
  import tensorflow as tf

  from corinfomax_tf.method import losses
  rs = np.random.RandomState(0)
  z1 = tf.math.l2_normalize(tf.constant(rs.randn(batch_size, dim), tf.float32), 1)
  z2 = tf.math.l2_normalize(tf.constant(rs.randn(batch_size, dim), tf.float32), 1)
  state = {"mu1": tf.zeros(dim, tf.float64), "R1": tf.eye(dim, dtype=tf.float64),
           "mu2": tf.zeros(dim, tf.float64), "R2": tf.eye(dim, dtype=tf.float64)}

  @tf.function
  def loss_and_grads(z1, z2):
    with tf.GradientTape() as tape:
      tape.watch([z1, z2])
      terms, new_state = losses.corinfomax_terms(z1, z2, state, alpha=250.0, cov_weight=1.0,
                                                 la_R=0.01, la_mu=0.01, eps=1e-8)
    return tape.gradient(terms["loss"], [z1, z2]), new_state
  grads, _ = loss_and_grads(z1, z2)
  grads[0].numpy()
  start = time.perf_counter()
  for _ in range(repeats):
    grads, _ = loss_and_grads(z1, z2)
  grads[0].numpy()
  return (time.perf_counter() - start) / repeats


def run_benchmark(cfg, *, batch_size, steps, warmup, jit, loss_dims, pipeline_batches,
                  matmul_size, pipeline_workers=1):
  import tensorflow as tf
  result = {"config": {"depth": cfg.model.depth, "stem": cfg.model.stem,
                       "width": cfg.model.width, "projector": cfg.model.projector,
                       "image_size": cfg.data.image_size, "batch_size": batch_size,
                       "mixed_precision": cfg.train.mixed_precision, "jit": jit,
                       "steps": steps},
            "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU"}
  # The reference rate first, on a machine not yet loaded by the step's memory.
  matmul = matmul_flops_per_second(matmul_size)
  runs = {}
  for use_xla in (False, True):
    runs[use_xla] = time_train_step(cfg, batch_size, steps, warmup, use_xla)
  head = runs[jit]
  model = head.pop("model")
  for r in runs.values():
    r.pop("model", None)
  flops_image = forward_flops_per_image(model, cfg.data.image_size)
  step_flops = 3 * 2 * flops_image * batch_size
  achieved = step_flops / head["seconds_per_step"]
  memory, memory_kind = peak_memory()
  result.update(
      images_per_second=head["images_per_second"],
      ms_per_step=1000.0 * head["seconds_per_step"],
      traces=head["traces"],
      loss=head["loss"],
      covariance_dtypes=head["covariance_dtypes"],
      xla={"ms_per_step": 1000.0 * runs[True]["seconds_per_step"],
           "loss": runs[True]["loss"], "traces": runs[True]["traces"]},
      no_xla={"ms_per_step": 1000.0 * runs[False]["seconds_per_step"],
              "loss": runs[False]["loss"], "traces": runs[False]["traces"]},
      model_flops_per_image_forward=flops_image,
      model_flops_per_step=step_flops,
      flops_counting="graph profiler, forward encoder+projector per image x 3 "
                     "(forward+backward) x 2 views x batch",
      achieved_flops_per_second=achieved,
      matmul_flops_per_second=matmul,
      matmul_size=matmul_size,
      mfu_vs_matmul=achieved / matmul,
      peak_memory_bytes=memory,
      peak_memory_kind=memory_kind)
  result["pipeline"] = time_pipeline(cfg, batch_size, pipeline_batches, pipeline_workers)
  result["pipeline"]["ratio_to_step"] = (result["pipeline"]["images_per_second"] /
                                         result["images_per_second"])
  result["loss_alone"] = {}
  for dim in loss_dims:
    seconds = time_loss(dim, batch_size)
    result["loss_alone"][str(dim)] = {
        "ms": 1000.0 * seconds, "share_of_step": seconds / head["seconds_per_step"]}
  return result


def format_table(r):
  lines = [
      f"device: {r['device']}  config: {r['config']}",
      f"training step: {r['ms_per_step']:.1f} ms/step, {r['images_per_second']:.1f} images/s "
      f"(XLA {r['xla']['ms_per_step']:.1f} ms, no XLA {r['no_xla']['ms_per_step']:.1f} ms)",
      f"traces of the step function: {r['traces']}",
      f"model FLOPs: {r['model_flops_per_image_forward'] / 1e9:.3f} GFLOP forward per image; "
      f"{r['model_flops_per_step'] / 1e9:.1f} GFLOP per step",
      f"achieved {r['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s; dense float32 matmul "
      f"({r['matmul_size']}^3) {r['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s; "
      f"utilisation {100 * r['mfu_vs_matmul']:.1f}%",
      f"peak memory: {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})",
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


def main(flag_values):
  f = flag_values
  cfg = config_lib.from_flags(f)
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
  result = run_benchmark(cfg, batch_size=cfg.train.batch_size, steps=f.steps,
                         warmup=f.warmup_steps, jit=f.jit, loss_dims=dims,
                         pipeline_batches=f.pipeline_batches,
                         matmul_size=f.matmul_size,
                         pipeline_workers=f.pipeline_workers)
  print(json.dumps(result, sort_keys=True) if f.json else format_table(result),
        flush=True)


def run():
  runner.run(main, define_flags, quiet_level="error")
