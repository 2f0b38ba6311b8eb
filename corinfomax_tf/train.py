r"""Pretrain an encoder with CorInfoMax, then probe it.

    python -m corinfomax_tf.train --flagfile=configs/digits.cfg
    python -m corinfomax_tf.train --flagfile=configs/cifar10.cfg --workdir=runs/c10

The workdir receives checkpoints (encoder, projector, loss state, optimizer and step),
flags.cfg (the resolved flags: rerun with --flagfile=<workdir>/flags.cfg),
config.json, TensorBoard logs under train/ and eval/, and summary.json. Running the
same command again resumes from the latest checkpoint; a finished run is not
trained again.
"""

import json
import os
import socket
import sys

# Before TensorFlow is imported: keep its C++ start-up chatter (INFO) off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags as absl_flags
from absl import logging as absl_logging

from corinfomax_tf import config as config_lib
from corinfomax_tf.atomic_files import write_atomic
from corinfomax_tf import flags as flags_lib

FLAGS = absl_flags.FLAGS


class WorkdirError(ValueError):
  """The workdir cannot be used."""


class WorkerLost(RuntimeError):
  """Another worker of a multi-worker run stopped; the last checkpoint is kept."""


# A worker lost is a temporary failure (EX_TEMPFAIL): a scheduler restarting every
# worker with the same command resumes the run from its last checkpoint.
WORKER_LOST_EXIT_CODE = 75


class Preempted(RuntimeError):
  """SIGTERM/SIGINT: a checkpoint was saved and the job stopped early."""


def prepare_workdir(workdir):
  """Creates the workdir and proves it writable before any work starts."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # One name per process: the workers of a multi-worker run share the workdir and
    # prepare it at the same moment (a shared name let one delete another's probe).
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w") as fh:
      fh.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir}: cannot write there ({e.strerror})") from None


# Room for TensorBoard logs, the resolved flags, reports and the summary.
LOG_BYTES_MARGIN = 64 * 2**20


def check_free_space(workdir, checkpoint_bytes, keep, free_bytes=None):
  """Refuses a run whose checkpoints cannot fit, before any work is done.

  keep + 1 checkpoints exist for a moment (the new one is written before the oldest
  is deleted).
  """
  import shutil
  needed = (keep + 1) * checkpoint_bytes + LOG_BYTES_MARGIN
  free = shutil.disk_usage(workdir).free if free_bytes is None else free_bytes
  if free < needed:
    mib = 2**20
    raise WorkdirError(
        f"--workdir={workdir}: {free / mib:.0f} MiB free, the run needs about "
        f"{needed / mib:.0f} MiB ({keep + 1} checkpoints of {checkpoint_bytes / mib:.0f} MiB "
        "and logs); free space, or lower --keep_checkpoints")


def steps_per_epoch(cfg, num_train):
  if cfg.train.steps_per_epoch:
    return cfg.train.steps_per_epoch
  steps = num_train // cfg.train.batch_size
  if steps < 1:
    raise config_lib.ConfigError(
        f"--batch_size={cfg.train.batch_size}: larger than the {num_train} training "
        f"images of --dataset={cfg.data.dataset}")
  return steps


def write_preview(cfg, source, monitoring, tf):
  """Both views of the first training images: TensorBoard image and preview.png."""
  from PIL import Image
  count = cfg.train.preview_images or 8
  images = [image.numpy() for image, _ in source.train.take(count)]
  grid = monitoring.augmentation_preview(
      images, (cfg.augment.view1, cfg.augment.view2), cfg.data.image_size,
      cfg.data.mean, cfg.data.std, seed=cfg.train.seed)
  Image.fromarray(grid).save(os.path.join(cfg.train.workdir, "preview.png"))
  with tf.summary.create_file_writer(os.path.join(cfg.train.workdir, "train")).as_default(step=0):
    tf.summary.image("augmentations/original_view1_view2", grid[None])


def report_data_scan(source, workdir, log):
  """Logs what the image-folder check kept, converted and skipped; writes the list."""
  for scan in source.scans:
    line = scan.summary()
    (log.warning if scan.num_skipped else log.info)(line)
    if scan.num_skipped:
      print(line, flush=True)
  if workdir:
    write_atomic(os.path.join(workdir, "data_report.json"),
                 json.dumps(source.scan_report(), indent=2, sort_keys=True))


def run(cfg, flagfile_text=None):
  """The whole job for a validated Config; returns the summary dict."""
  # TensorFlow is imported here, after flag validation, so that a bad flag costs
  # no TensorFlow start-up and logical CPU devices can still be configured.
  import keras
  import tensorflow as tf

  from corinfomax_tf import callbacks as callbacks_lib
  from corinfomax_tf import data as data_lib
  from corinfomax_tf import distribute
  from corinfomax_tf import evaluation
  from corinfomax_tf import monitoring
  from corinfomax_tf import schedules
  from corinfomax_tf import ssl_model
  from corinfomax_tf.models import resnet

  t = cfg.train
  prepare_workdir(t.workdir)
  strategy = distribute.make_strategy(t.strategy, t.num_cpu_devices, t.cluster_resolver,
                                      t.slurm_port_base)
  replicas = strategy.num_replicas_in_sync
  if t.batch_size % replicas:
    raise config_lib.ConfigError(
        f"--batch_size={t.batch_size}: not divisible by the {replicas} replicas")
  chief = distribute.is_chief(strategy)
  # Every worker restores the chief's checkpoints (the workdir is on a file system
  # all hosts share), so that all of them resume at the same step and run the same
  # collectives. The others must save too (saving is collective) but not over the
  # chief's files.
  ckpt_dir = chief_ckpt_dir = os.path.join(t.workdir, "checkpoints")
  if not chief:
    ckpt_dir = os.path.join(t.workdir, "tmp_workers", f"worker_{strategy.cluster_resolver.task_id}")

  saved = config_lib.load_saved_config(t.workdir)
  if saved is not None and tf.train.latest_checkpoint(chief_ckpt_dir):
    config_lib.check_resume_compatible(saved, cfg)

  d = cfg.data
  source = data_lib.load_source(d.dataset, **d.source_kwargs())
  if source.scans:
    report_data_scan(source, t.workdir if chief else None, absl_logging)
  spe = steps_per_epoch(cfg, source.num_train)
  total_steps = spe * t.epochs

  if chief:
    write_atomic(os.path.join(t.workdir, "config.json"), cfg.to_json())
    if flagfile_text:
      write_atomic(os.path.join(t.workdir, "flags.cfg"), flagfile_text)
    if t.preview_images or t.preview_only:
      write_preview(cfg, source, monitoring, tf)
    if t.preview_only:
      print(f"Augmentation preview written to {t.workdir}/preview.png and "
            f"{t.workdir}/train", flush=True)
      return {}

  keras.utils.set_random_seed(t.seed)
  if t.deterministic:
    tf.config.experimental.enable_op_determinism()
  if t.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(f"mixed_{t.mixed_precision}")

  schedule = schedules.WarmupCosine(
      base_lr=cfg.optim.lr, total_steps=total_steps,
      warmup_steps=min(cfg.optim.warmup_epochs * spe, total_steps),
      warmup_start_lr=cfg.optim.warmup_start_lr, min_lr=cfg.optim.min_lr)
  with strategy.scope():
    model = ssl_model.build_pretraining_model(
        cfg.model, cfg.loss, sync_bn=cfg.model.sync_bn and replicas > 1,
        vector_logs=distribute.is_multi_worker(strategy),
        probe_classes=source.num_classes if t.online_probe else 0)
    optimizer = schedules.ReferenceSGD(schedule, momentum=cfg.optim.momentum,
                                       l2_weight_decay=cfg.optim.weight_decay)
    if t.mixed_precision == "float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=t.jit_compile)
    optimizer.build(model.pretraining_variables)
    tracked = dict(encoder=model.encoder, projector=model.projector,
                   loss_state=model.loss_layer, optimizer=optimizer, step=model.step_counter)
    if model.probe_head is not None:
      model.probe_optimizer.learning_rate = t.online_probe_lr
      tracked.update(probe_head=model.probe_head, probe_optimizer=model.probe_optimizer)
    checkpoint = tf.train.Checkpoint(**tracked)
    if chief:
      check_free_space(t.workdir, callbacks_lib.checkpoint_bytes(
          [v for obj in tracked.values() for v in getattr(obj, "variables", [obj])]),
          t.keep_checkpoints)
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=t.keep_checkpoints)
    latest = tf.train.latest_checkpoint(chief_ckpt_dir)
    if latest:
      checkpoint.restore(latest).assert_existing_objects_matched()
      print(f"Resumed from {latest}", flush=True)

  step = int(model.step_counter.numpy())
  summary_path = os.path.join(t.workdir, "summary.json")
  previous = {}
  if os.path.exists(summary_path):
    with open(summary_path) as fh:
      previous = json.load(fh)
  summary = dict(previous)
  summary.update(dataset=d.dataset, steps_per_epoch=spe, total_steps=total_steps,
                 replicas=replicas, global_batch_size=t.batch_size)

  def eval_split(split):
    return data_lib.eval_dataset(split, batch_size=256, image_size=d.image_size,
                                 mean=d.mean, std=d.std)

  def dataset_from(start_step):
    # The same stream as an uninterrupted run, from its start_step-th batch on. Each
    # worker builds its own pipeline and decodes and augments only its part of each
    # global batch (tf.data's auto-sharding would have every worker process all of it).
    return strategy.distribute_datasets_from_function(
        lambda input_context: data_lib.two_view_dataset(
            source, global_batch_size=t.batch_size, image_size=d.image_size,
            views=(cfg.augment.view1, cfg.augment.view2), mean=d.mean, std=d.std,
            seed=t.seed, shuffle_buffer=d.shuffle_buffer, deterministic=t.deterministic,
            skip_batches=start_step, input_context=input_context))

  preemption = None
  if step < total_steps:
    throughput = callbacks_lib.Throughput(t.batch_size)
    preemption = callbacks_lib.PreemptionSaver(manager)
    cbs = [callbacks_lib.FiniteLossGuard(t.workdir)]
    if t.loss_spike_factor:
      cbs.append(callbacks_lib.LossSpikeGuard(t.loss_spike_factor, t.loss_spike_window,
                                              t.workdir))
    cbs += [throughput, preemption]
    monitor = None
    if chief:
      cbs.append(callbacks_lib.ScalarLogger(os.path.join(t.workdir, "train"),
                                            t.log_every_steps, t.batch_size, schedule))
      if t.monitor_every_steps:
        monitor = monitoring.TrainingMonitor(os.path.join(t.workdir, "train"),
                                             t.monitor_every_steps, t.collapse_rank_share)
        cbs.append(monitor)
      if step == 0 and flagfile_text:
        with tf.summary.create_file_writer(os.path.join(t.workdir, "train")).as_default(step=0):
          tf.summary.text("config/flags", "```\n" + flagfile_text + "```")
    # Saved last, after the monitors of the epoch's last step have run.
    cbs.append(callbacks_lib.CheckpointSaver(manager))
    knn = None
    if t.knn_every_epochs and chief:
      knn = callbacks_lib.KNNMonitor(
          eval_split(source.train), eval_split(source.test), source.num_classes,
          t.knn_every_epochs, t.knn_k, t.knn_temperature, os.path.join(t.workdir, "eval"))
      cbs.append(knn)
    verbose = (1 if sys.stdout.isatty() else 2) if t.verbose == "auto" else int(t.verbose)
    if verbose and chief:
      cbs.append(callbacks_lib.ProgressBar(t.epochs, spe, t.batch_size,
                                           interactive=verbose == 1))
    try:
      with preemption.installed():
        history = None
        if step % spe:
          # Stopped mid-epoch (preemption): finish that epoch first.
          history = model.fit(dataset_from(step), epochs=step // spe + 1,
                              initial_epoch=step // spe, steps_per_epoch=spe - step % spe,
                              callbacks=cbs, verbose=0, shuffle=False)
          step = int(model.step_counter.numpy())
        if step < total_steps and not preemption.stopped:
          history = model.fit(dataset_from(step), epochs=t.epochs,
                              initial_epoch=step // spe, steps_per_epoch=spe,
                              callbacks=cbs, verbose=0, shuffle=False)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as e:
      if not distribute.is_multi_worker(strategy):
        raise
      # MultiWorkerMirroredStrategy's heartbeats notice a dead peer within seconds and
      # abort the collectives on every survivor.
      reason = " ".join(e.message.split("}}")[-1].strip().splitlines()[:2])[:240]
      raise WorkerLost(
          f"a worker was lost after step {int(model.step_counter.numpy())} ({reason}); "
          f"the last checkpoint ({tf.train.latest_checkpoint(chief_ckpt_dir) or 'none yet'}) is "
          "kept: restart every worker with the same command to resume") from None
    except tf.errors.InvalidArgumentError as e:
      # Some Cholesky kernels raise instead of returning NaN on a matrix that is
      # not positive definite: the same failure as a non-finite loss.
      if "holesky" not in str(e):
        raise
      raise callbacks_lib.NonFiniteLossError(
          f"R + eps*I is not positive definite after step "
          f"{int(model.step_counter.numpy())}: training stopped; the last good "
          f"checkpoint in {t.workdir} is kept (lower --lr or raise --eps)") from None
    if preemption.stopped:
      raise Preempted(f"stopped by signal {preemption.signal_name}: checkpoint saved at step "
                      f"{preemption.saved_step} in {t.workdir}; rerun the same command "
                      "to resume")
    final = {k: float(v[-1][0] if hasattr(v[-1], "__len__") else v[-1])
             for k, v in history.history.items()}
    summary.update(final_terms=final, images_per_second=throughput.images_per_second())
    if knn is not None and knn.last:
      summary["knn"] = knn.last
    if monitor is not None:
      summary["monitor"] = monitor.last
      summary["health_warnings"] = [f"step {s}: {m}" for s, m in monitor.warnings[-10:]]
  else:
    print(f"Already trained: step {step} of {total_steps} in {t.workdir}", flush=True)
    if "probe" in previous or t.probe_epochs == 0:
      return previous
  summary["step"] = int(model.step_counter.numpy())

  if t.probe_epochs and chief:
    def probe(encoder):
      return evaluation.probe_encoder(encoder, eval_split(source.train),
                                      eval_split(source.test), source.num_classes,
                                      epochs=t.probe_epochs, seed=t.seed)
    summary["probe"] = probe(model.encoder)
    print(f"Linear probe, pretrained encoder: top-1 {summary['probe']['top1']:.2f}%",
          flush=True)
    if t.probe_random:
      keras.utils.set_random_seed(t.seed + 1)
      random_encoder = resnet.ResNetEncoder(depth=cfg.model.depth, stem=cfg.model.stem,
                                            width=cfg.model.width, name="random_encoder")
      summary["random_probe"] = probe(random_encoder)
      print(f"Linear probe, random encoder:     top-1 "
            f"{summary['random_probe']['top1']:.2f}%", flush=True)
    writer = tf.summary.create_file_writer(os.path.join(t.workdir, "eval"))
    with writer.as_default(step=summary["step"]):
      for key in ("probe", "random_probe"):
        for metric, value in summary.get(key, {}).items():
          tf.summary.scalar(f"{key}/{metric}", value)
    writer.flush()
  if chief:
    write_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True))
    print(json.dumps(summary, sort_keys=True), flush=True)
  return summary


def main(argv):
  flags_lib.begin_command(argv, FLAGS)
  try:
    cfg = config_lib.from_flags(FLAGS)
  except config_lib.ConfigError as e:
    flags_lib.exit_with_error(str(e))
  from corinfomax_tf import callbacks as callbacks_lib
  from corinfomax_tf import data as data_lib
  from corinfomax_tf.distribute import StrategyError
  try:
    run(cfg, flags_lib.resolved_flagfile(FLAGS))
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(143)
  except WorkerLost as e:
    flags_lib.exit_with_error(str(e), code=WORKER_LOST_EXIT_CODE)
  except (config_lib.ConfigError, data_lib.DataError, WorkdirError, StrategyError,
          callbacks_lib.NonFiniteLossError, callbacks_lib.LossSpikeError,
          callbacks_lib.CheckpointWriteError) as e:
    flags_lib.exit_with_error(str(e))


if __name__ == "__main__":
  flags_lib.define_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)
