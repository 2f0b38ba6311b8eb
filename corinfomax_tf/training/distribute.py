"""Strategy construction and the cross-replica gather.

Library code never creates a strategy: `train.py` calls `make_strategy` once and
builds everything inside its scope.
"""

import json
import os

import keras
import tensorflow as tf

from corinfomax_tf import errors


def split_cpu(num_devices):
  """Splits the first CPU into `num_devices` logical devices (for tests and for
  trying MirroredStrategy without GPUs). Must run before TensorFlow initialises
  its devices; returns the logical device names."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is None or len(current) != num_devices:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  return [d.name for d in tf.config.list_logical_devices("CPU")]


SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                   "SLURM_STEP_TASKS_PER_NODE")


def cluster_resolver(kind, port_base=8888):
  """None (TF_CONFIG, TensorFlow's default) or a SlurmClusterResolver.

  Under SLURM every task started by `srun` gets the cluster from SLURM's own
  variables: hosts from the step's node list, its index from SLURM_PROCID, one port
  per task from `port_base` on.
  """
  if kind == "tf_config":
    return None
  if kind != "slurm":
    raise errors.ConfigError(f"--cluster_resolver={kind}: must be tf_config or slurm")
  missing = [v for v in SLURM_VARIABLES if v not in os.environ]
  if missing:
    raise errors.ConfigError(f"--cluster_resolver=slurm: {missing[0]} is not set (start "
                        "the command with srun inside a SLURM allocation)")
  if tf.config.list_physical_devices("GPU"):
    return tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base)
  # CPU-only nodes: the resolver asks nvidia-smi for GPUs and lists one task per GPU
  # slot (none with 0 GPUs), so it is given dummy slots and told not to apply them.
  return tf.distribute.cluster_resolver.SlurmClusterResolver(
      port_base=port_base, gpus_per_node=1024, gpus_per_task=1, auto_set_gpu=False)


def make_strategy(name, num_cpu_devices=0, resolver="tf_config", port_base=8888):
  """default | mirrored | multi_worker -> a tf.distribute.Strategy."""
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
      return tf.distribute.MirroredStrategy()
    if num_cpu_devices > 1:
      return tf.distribute.MirroredStrategy(split_cpu(num_cpu_devices))
    return tf.distribute.MirroredStrategy(["/cpu:0"])
  if name == "multi_worker":
    if "TF_CONFIG" in os.environ:
      try:
        json.loads(os.environ["TF_CONFIG"])
      except ValueError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=cluster_resolver(resolver, port_base))
  raise ValueError(f"--strategy={name}: must be default, mirrored or multi_worker")


def num_replicas():
  return tf.distribute.get_strategy().num_replicas_in_sync


def gather(x):
  """Concatenates `x` over all replicas along axis 0, differentiably.

  all_gather's gradient all-reduces the upstream gradient (sum over replicas) and
  keeps this replica's slice, so a loss computed identically on every replica must
  be divided by the replica count before differentiation (see ssl_model.py).
  """
  if keras.backend.backend() != "tensorflow":
    return x   # JAX: one program over the global batch (jax_step.py)
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return x
  return ctx.all_gather(x, axis=0)


def is_multi_worker(strategy):
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
  """The worker that writes checkpoints, logs and summaries."""
  if not is_multi_worker(strategy):
    return True
  resolver = strategy.cluster_resolver
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type is None or task_type == "chief" or (
      task_type == "worker" and task_id == 0 and
      "chief" not in resolver.cluster_spec().as_dict())


def value_of_first_replica(strategy, value):
  """`value` (an integer) as the process holding replica 0 passes it, on every
  worker: each worker passes its own, only replica 0's counts (one all-reduce)."""

  def contribution():
    ctx = tf.distribute.get_replica_context()
    first = tf.equal(ctx.replica_id_in_sync_group, 0)
    return tf.where(first, tf.constant(value, tf.int64), tf.constant(0, tf.int64))
  @tf.function
  def total():
    return strategy.reduce("SUM", strategy.run(contribution), axis=None)
  return int(total())


def check_backend(backend):
  """True where the job trains on JAX. Keras reads KERAS_BACKEND once, at its first
  import: a process whose Keras runs another backend than `backend` is one line."""
  actual = keras.backend.backend()
  if actual != backend:
    raise errors.ConfigError(
        f"--backend={backend}: Keras in this process runs its {actual!r} backend "
        f"(KERAS_BACKEND is read when keras is first imported): set "
        f"KERAS_BACKEND={backend} before importing keras, or give --backend={actual}")
  return backend == "jax"


def jax_data_parallel(all_devices):
  """On JAX, --strategy=mirrored: the batch sharded over every device
  (keras.distribution.DataParallel; the step is one program over the global batch).
  Returns the number of devices the batch is split over."""
  import jax   # JAX is optional: only its backend imports it
  devices = jax.devices()
  if not all_devices or len(devices) == 1:
    return 1
  keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
  return len(devices)
