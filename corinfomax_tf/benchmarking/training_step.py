"""The training step's benchmark: the real step with and without XLA, model FLOPs
against a dense matrix product timed in the same run, the loss alone, peak memory.

See corinfomax_tf/cli/benchmark.py for what is measured and how.
"""

import os
import resource
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.profiler import model_analyzer, option_builder

from corinfomax_tf.benchmarking import input_pipeline
from corinfomax_tf.method import losses
from corinfomax_tf.method import model as ssl_model
from corinfomax_tf.training import schedules


def peak_memory():
  """(bytes, what): GPU peak when a GPU is used, else the process's peak RSS."""
  if tf.config.list_physical_devices("GPU"):
    return tf.config.experimental.get_memory_info("GPU:0")["peak"], "gpu_peak_bytes"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss_bytes"


def matmul_dtype(mixed_precision):
  """The compute dtype of the step: its utilisation is measured against a matrix
  product in that dtype (bf16 steps against a bf16 product: on a CPU with AMX or
  AVX-512 BF16 it runs several times faster than float32, and a float32 denominator
  overstates the utilisation)."""
  return {"none": "float32"}.get(mixed_precision, mixed_precision)


def matmul_flops_per_second(n, repeats=5, rounds=3, dtype="float32"):
  """Best of `rounds` timings of `repeats` n x n matmuls in `dtype`: the machine's
  attainable dense rate, the denominator of the utilisation."""
  a = tf.cast(tf.random.normal((n, n)), dtype)
  b = tf.cast(tf.random.normal((n, n)), dtype)
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


def cpuinfo_fields(cpuinfo="/proc/cpuinfo"):
  """{field: value} of the first processor /proc/cpuinfo lists (every core lists the
  same model, clock and flags), or None where there is no such file."""
  try:
    with open(cpuinfo) as fh:
      text = fh.read()
  except OSError:
    return None
  fields = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  return fields


def cpu_peak(cpuinfo="/proc/cpuinfo", cores=None, max_isa=None):
  """The CPU's theoretical float32 peak as detected: cores x FMA units x vector lanes x
  2 FLOPs (a fused multiply-add) x clock.

  /proc/cpuinfo gives the cores, the clock ("cpu MHz") and the vector width (avx512f:
  16 float32 lanes; avx2 with fma: 8; else 4). It does not list FMA units per core:
  2 are assumed (Zen 2-4's 256-bit units, Intel's cores with AVX2, Xeons with two
  AVX-512 units), except AMD with AVX-512 (Zen 4 runs a 512-bit FMA on its two 256-bit
  units: 1 unit of 16 lanes). A cap on oneDNN's instruction set (`max_isa`, by
  default ONEDNN_MAX_CPU_ISA: AVX2... or SSE41, as tools/step_pairs.py --max_isa sets
  it) caps the vector width the same way. Returns a dict with every factor, or None
  where the file says nothing (not Linux, not x86)."""
  fields = cpuinfo_fields(cpuinfo)
  if fields is None:
    return None
  try:
    mhz = float(fields["cpu MHz"])
  except (KeyError, ValueError):
    return None
  flags = set(fields.get("flags", "").split())
  amd = "AMD" in fields.get("vendor_id", "") or "AMD" in fields.get("model name", "")
  cap = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") if max_isa is None else max_isa).upper()
  if cap.startswith("AVX2"):
    flags -= {"avx512f"}
  elif cap == "SSE41":
    flags -= {"avx512f", "avx2"}
  if "avx512f" in flags:
    lanes, units, vector = 16, (1 if amd else 2), "AVX-512"
  elif "avx2" in flags and "fma" in flags:
    lanes, units, vector = 8, 2, "AVX2 + FMA"
  else:
    lanes, units, vector = 4, 2, "SSE"
  cores = cores or os.cpu_count() or 1
  return {"flops_per_second": cores * units * lanes * 2 * mhz * 1e6, "cores": cores,
          "fma_units_per_core": units, "float32_lanes": lanes, "vector": vector,
          "clock_ghz": mhz / 1000.0, "cpu": fields.get("model name", "")}


# Environment variables read at start-up that change the step's speed: the thread
# pools, oneDNN (on or off, and the highest instruction set it may use) and XLA's
# flags. The benchmark records those set, so that a figure says what produced it.
SPEED_SETTINGS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                  "TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "XLA_FLAGS")


def speed_settings(environ=None):
  """{name: value} of the SPEED_SETTINGS this process was started with."""
  environ = os.environ if environ is None else environ
  return {k: environ[k] for k in SPEED_SETTINGS if environ.get(k)}


def forward_flops_per_image(model, image_size):
  """FLOPs of encoder + projector forward for one image, from the graph."""

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

  keras.utils.set_random_seed(cfg.train.seed)
  model = ssl_model.build_pretraining_model(cfg.model, cfg.loss,
                                            image_size=cfg.data.image_size)
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


def time_loss(dim, batch_size, repeats=5):
  """Covariance updates + two log-determinants, forward and backward, at D = dim."""

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

  result = {"config": {"depth": cfg.model.depth, "stem": cfg.model.stem,
                       "width": cfg.model.width, "projector": cfg.model.projector,
                       "image_size": cfg.data.image_size, "batch_size": batch_size,
                       "mixed_precision": cfg.train.mixed_precision, "jit": jit,
                       "steps": steps},
            "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            "settings": speed_settings()}
  # The reference rate first, on a machine not yet loaded by the step's memory.
  dtype = matmul_dtype(cfg.train.mixed_precision)
  matmul = matmul_flops_per_second(matmul_size, dtype=dtype)
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
  # The float32 peak: a denominator for float32 steps on the CPU only.
  peak = cpu_peak() if result["device"] == "CPU" and dtype == "float32" else None
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
      matmul_dtype=dtype,
      mfu_vs_matmul=achieved / matmul,
      cpu_peak=peak,
      mfu_vs_peak=achieved / peak["flops_per_second"] if peak else None,
      peak_memory_bytes=memory,
      peak_memory_kind=memory_kind)
  result["pipeline"] = input_pipeline.time_pipeline(cfg, batch_size, pipeline_batches, pipeline_workers)
  result["pipeline"]["ratio_to_step"] = (result["pipeline"]["images_per_second"] /
                                         result["images_per_second"])
  result["loss_alone"] = {}
  for dim in loss_dims:
    seconds = time_loss(dim, batch_size)
    result["loss_alone"][str(dim)] = {
        "ms": 1000.0 * seconds, "share_of_step": seconds / head["seconds_per_step"]}
  return result
