"""The pretraining job: prepare, build and restore, fit, evaluate, summarise.

    summary = PretrainingJob(cfg, flagfile_text).run()

`cfg` is a validated `config.Config`; nothing here reads flags. The workdir layer
(`training.workdir`) owns the lock, the saved config, the checkpoints and the atomic
result; this module owns what is particular to pretraining: the strategy, the
two-view stream that resumes exactly, the callbacks, and the end-of-training probes.
"""

import dataclasses
import hashlib
import json
import numbers
import os
import random
import re
import sys
import types

import keras
import tensorflow as tf
from absl import logging as absl_logging
from PIL import Image

from corinfomax_tf import config as config_lib
from corinfomax_tf import errors, fingerprints
from corinfomax_tf import flags as flags_lib
from corinfomax_tf.data import datasets as data_lib
from corinfomax_tf.evaluation import monitoring, probes
from corinfomax_tf.export import saved_model
from corinfomax_tf.method import model as ssl_model
from corinfomax_tf.models import factory, pooling
from corinfomax_tf.training import callbacks as callbacks_lib
from corinfomax_tf.training import distribute, keras_state, schedules
from corinfomax_tf.training import workdir as workdir_lib
from corinfomax_tf.training import xla_choice

SUMMARY_FILE = "summary.json"
# Beside a mid-epoch checkpoint: the running means of the epoch it interrupted.
EPOCH_TERMS_FILE = "epoch_terms.json"
# Keys config.json holds beside the config's sections: what a resume must keep (by
# flag name) and which images were trained on.
RESUME_KEY = "resume"
IMAGES_KEY = "train_images"


def _shown(value):
  return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def saved_resume_settings(saved):
  """The resume settings a workdir's config.json holds (older workdirs: the fields
  of its sections, by name, for those sections that are compared)."""
  if RESUME_KEY in saved:
    # Workdirs from before --backend trained on TensorFlow.
    return {"backend": "tensorflow", **saved[RESUME_KEY]}
  flat = {}
  for section in ("data", "model", "loss", "optim", "train"):
    flat.update(saved.get(section, {}))
  flat.pop("extend_epochs", None)
  flat.setdefault("backend", "tensorflow")
  return flat


def check_resume(saved, current, workdir):
  """Refuses to resume a pretraining workdir with settings that change the run: one
  line naming the flag, both values and the ways out. `saved`, `current`: flag name
  -> value (`config.pretraining_resume_settings`)."""
  def refuse(name, now, before, ways):
    raise errors.ConfigError(
        f"--{name}={_shown(now)}: the workdir {workdir} was trained with "
        f"--{name}={_shown(before)}; {ways}")
  same = "use a new --workdir, or give the same value"
  old_phases = list(saved.get("extend_epochs", []))
  new_phases = list(current["extend_epochs"])
  if new_phases[:len(old_phases)] != old_phases:
    refuse("extend_epochs", new_phases or "''", old_phases,
           "give the same phases again to resume (append a phase to train longer), or "
           "use a new --workdir")
  for name, value in current.items():
    if name == "extend_epochs" or name not in saved:
      continue
    if saved[name] == value:   # both JSON values: config.json and _normalise'd settings
      continue
    if name == "epochs":
      more = value - saved[name]
      refuse(name, value, saved[name],
             "its learning-rate schedule was made for that length. Use a new --workdir, "
             "or the same value" + (f" and --extend_epochs={more} to train {more} more "
                                    "epochs on (docs/training.md, 'Training longer')"
                                    if more > 0 else ""))
    refuse(name, value, saved[name], same)


def images_fingerprint(source):
  """What identifies the training images: their count, and a digest of the kept
  files' paths (relative to their root) and labels where they are files."""
  info = {"count": int(source.num_train)}
  if source.scans:
    info["files_sha256"] = fingerprints.files_digest(source.scans, stat=False)
  return info


def steps_per_epoch(cfg, num_train):
  if cfg.train.steps_per_epoch:
    return cfg.train.steps_per_epoch
  steps = num_train // cfg.train.batch_size
  if steps < 1:
    raise errors.ConfigError(
        f"--batch_size={cfg.train.batch_size}: larger than the {num_train} training "
        f"images of --dataset={cfg.data.dataset}")
  return steps


def report_data_scan(sources, workdir, log):
  """Logs what the image-folder checks kept, converted and skipped; writes the list."""
  report = {}
  for source in sources:
    for scan in source.scans:
      line = scan.summary()
      (log.warning if scan.num_skipped else log.info)(line)
      if scan.num_skipped:
        print(line, flush=True)
    report.update(source.scan_report())
  if workdir is not None and report:
    workdir.write_json("data_report.json", report)


def load_eval_source(cfg, train_source, log):
  """(the labelled source the probe and kNN monitor use, or None; why there is none).

  The training set itself unless --eval_dataset names another; an unlabeled training
  set without one has none, and the job says so once instead of failing at the end.
  """
  d, t = cfg.data, cfg.train
  if not (t.probe_epochs or t.knn_every_epochs):
    return None, None
  eval_cfg = d.eval_data()
  if eval_cfg is None:
    reason = (f"--dataset={d.dataset} has no labels and no --eval_dataset names a "
              "labelled set")
    log(f"Linear probe and kNN monitor skipped: {reason}")
    return None, reason
  if eval_cfg is d:
    if not train_source.labelled:
      reason = "the training images have no labels and no --eval_dataset names a labelled set"
      log(f"Linear probe and kNN monitor skipped: {reason}")
      return None, reason
    return train_source, None
  try:
    source = data_lib.load_source(eval_cfg.dataset, **eval_cfg.source_kwargs())
  except errors.DataError as e:
    # The loader names the training flags; here they are the --eval_ ones.
    raise errors.DataError(re.sub(r"--(dataset|data_dir|train_split|test_split)(?=[=:/])",
                                  r"--eval_\1", str(e))) from None
  shape = source.image_shape
  if shape is not None and max(shape) != d.image_size:
    raise errors.ConfigError(
        f"--eval_dataset={eval_cfg.dataset}: its images are {shape[0]}x{shape[1]} and "
        f"the encoder's {d.image_size}x{d.image_size} (--image_size); the probe would "
        "judge it on resized images: evaluate on a set of the encoder's size (a "
        "labelled --eval_dataset=folder resizes any images like ImageNet)")
  return source, None


def write_preview(cfg, source, workdir):
  """Both views of the first training images: TensorBoard image and preview.png."""

  count = cfg.train.preview_images or 8
  images = [image.numpy() for image, _ in source.train.take(count)]
  grid = monitoring.augmentation_preview(
      images, (cfg.augment.view1, cfg.augment.view2), cfg.data.image_size,
      cfg.data.mean, cfg.data.std, seed=cfg.train.seed)
  Image.fromarray(grid).save(workdir.join("preview.png"))
  with tf.summary.create_file_writer(workdir.join("train")).as_default(step=0):
    tf.summary.image("augmentations/original_view1_view2", grid[None])


def _final_terms(history):
  return {k: float(v[-1][0] if hasattr(v[-1], "__len__") else v[-1])
          for k, v in history.history.items()}


class PretrainingJob:
  """One pretraining run of a validated Config, in the phases its `run` lists.

  `backbone` (optional): a keras.Model, or a function of no arguments returning one
  (called inside the strategy's scope, as a multi-device run needs), used instead of
  the backbone the config names. `source` (optional): a `datasets.Source` used
  instead of the data set the config names (`datasets.source_from_dataset` makes one
  of any tf.data.Dataset of images). `eval_source` (optional): the labelled source
  of the probe and the kNN monitor (bank: its train split, queries: its test split)
  instead of the one the config names. `callbacks` (optional): Keras callbacks run
  after the job's own (a sweep's trial reporter reads the monitors there).
  """

  def __init__(self, cfg, flagfile_text=None, log=print, *, backbone=None, source=None,
               eval_source=None, callbacks=()):
    self.cfg = cfg
    self.flagfile_text = flagfile_text
    self.log = log
    self.given_backbone = backbone
    self.given_source = source
    self.given_eval_source = eval_source
    self.extra_callbacks = list(callbacks)

  def run(self):
    """The whole job; returns the summary dict (also written to summary.json)."""
    t = self.cfg.train
    self.jax = distribute.check_backend(t.backend)
    if self.jax:
      # One TensorFlow device feeds the data; keras.distribution shards the batch.
      self.strategy = distribute.make_strategy("default")
      self.jax_devices = distribute.jax_data_parallel(t.strategy == "mirrored")
    else:
      self.strategy = distribute.make_strategy(t.strategy, t.num_cpu_devices,
                                               t.cluster_resolver, t.slurm_port_base)
    self.chief = distribute.is_chief(self.strategy)
    # Only the chief locks: a multi-worker run is one holder.
    with workdir_lib.Workdir(t.workdir, command="corinfomax_tf.train", lock=self.chief,
                             log=self.log) as self.workdir:
      if not self.prepare():
        return {}
      self.build_and_restore()
      if self.step < self.total_steps:
        self.fit()
      else:
        self.log(f"Already trained: step {self.step} of {self.total_steps} in {t.workdir}")
        # Done unless a rerun asks for what the first run did not do (an export).
        if (("probe" in self.previous or t.probe_epochs == 0) and
            (not t.export or "export" in self.previous)):
          return self.previous
      self.summary["step"] = int(self.model.step_counter.numpy())
      if t.export and self.chief:
        self.export()
      self.evaluate()
      return self.summarise()

  # -- phases ----------------------------------------------------------------

  def prepare(self):
    """Replicas, the saved config, the data, the resolved flags and the preview.
    Returns False when the job ends here (--preview_only)."""

    cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
    self.replicas = self.jax_devices if self.jax else self.strategy.num_replicas_in_sync
    if t.batch_size % self.replicas:
      raise errors.ConfigError(
          f"--batch_size={t.batch_size}: not divisible by the {self.replicas} replicas")
    saved = self.workdir.read_json("config.json")
    if saved is not None and not self.workdir.has_checkpoints():
      saved = None   # nothing trained yet: a fresh start
    resume = config_lib.pretraining_resume_settings(cfg)
    if saved is not None:
      check_resume(saved_resume_settings(saved), resume, t.workdir)
    if d.data_service:   # before the (possibly long) scan of the images
      data_lib.check_data_service(d.data_service)
      self.log(f"Training images are read, decoded and augmented by the tf.data service "
               f"at {d.data_service}")
    self.source = self.given_source or data_lib.load_source(d.dataset, **d.source_kwargs())
    self.eval_source, self.no_eval_reason = None, None
    if self.chief and self.given_eval_source is not None:
      self.eval_source = self.given_eval_source
    elif self.chief:
      self.eval_source, self.no_eval_reason = load_eval_source(cfg, self.source, self.log)
    sources = [s for s in (self.source, self.eval_source) if s is not None]
    if any(s.scans for s in sources):
      report_data_scan(sources, self.workdir if self.chief else None, absl_logging)
    images = images_fingerprint(self.source)
    if saved is not None and saved.get(IMAGES_KEY, images) != images:
      raise errors.DataError(
          f"--dataset={d.dataset}"
          + (f" --data_dir={d.data_dir}" if d.data_dir else "")
          + f": not the training images the workdir {t.workdir} was trained on "
          f"({saved[IMAGES_KEY]['count']} images, now {images['count']}"
          + ("" if saved[IMAGES_KEY]['count'] != images['count'] else
             ", files added, removed or renamed")
          + "): the data order would change; use a new --workdir, or restore the images")
    self.spe = steps_per_epoch(cfg, self.source.num_train)
    extension = config_lib.extension_phases(t.extend_epochs)
    self.phases = [(epochs * self.spe, lr) for epochs, lr in extension]
    self.total_epochs = t.epochs + sum(epochs for epochs, _ in extension)
    self.total_steps = self.spe * self.total_epochs
    if self.chief:
      self.workdir.write_json("config.json", {**cfg.to_dict(), RESUME_KEY: resume,
                                              IMAGES_KEY: images})
      if self.flagfile_text:
        self.workdir.write_text("flags.cfg", self.flagfile_text)
      if t.preview_images or t.preview_only:
        write_preview(cfg, self.source, self.workdir)
      if t.preview_only:
        self.log(f"Augmentation preview written to {t.workdir}/preview.png and "
                 f"{t.workdir}/train")
        return False
    return True

  def build_and_restore(self):
    """Seeds, the model, optimizer and checkpoints (inside the strategy's scope),
    then the newest intact checkpoint."""

    t = self.cfg.train
    if t.mixed_precision != "none":
      keras.mixed_precision.set_global_policy(f"mixed_{t.mixed_precision}")
    self.jit = self._choose_jit()
    keras.utils.set_random_seed(t.seed)
    if t.deterministic:
      tf.config.experimental.enable_op_determinism()
    with self.strategy.scope():
      tracked = self._build_model()
      # Every worker restores the chief's checkpoints (the workdir is on a file
      # system all hosts share), so that all of them resume at the same step and
      # run the same collectives. The others must save too (saving is collective)
      # but not over the chief's files.
      directory = "checkpoints"
      if not self.chief:
        directory = os.path.join(
            "tmp_workers", f"worker_{self.strategy.cluster_resolver.task_id}")
      if self.chief:
        self.workdir.check_free_space(workdir_lib.checkpoint_bytes(
            [v for obj in tracked.values() for v in getattr(obj, "variables", [obj])]),
            t.keep_checkpoints)
      self.checkpoints = self.workdir.checkpoints(
          tf.train.Checkpoint(**tracked), keep=t.keep_checkpoints, directory=directory,
          restore_from="checkpoints", chief=self.chief,
          mirrors=keras_state.mirrors_in(tracked))
      restored = self.checkpoints.restore_latest()
      if restored:
        self.log(f"Resumed from {restored}")
    self.step = int(self.model.step_counter.numpy())
    self.previous = self.workdir.read_json(SUMMARY_FILE) or {}
    self.summary = dict(self.previous)
    self.summary.update(dataset=self.cfg.data.dataset, steps_per_epoch=self.spe,
                        total_steps=self.total_steps, replicas=self.replicas,
                        global_batch_size=t.batch_size, epochs=self.total_epochs)
    if self.phases:
      self.summary["extensions"] = [
          dict(epochs=steps // self.spe, steps=[first + 1, first + steps],
               lr_start=lr, lr_end=self.cfg.optim.min_lr)
          for first, steps, lr in self.schedule.segments]
    self.multi_worker = distribute.is_multi_worker(self.strategy)

  def _build_model(self):
    """Model, optimizer and schedule; returns what a checkpoint tracks (the names
    are those of every checkpoint written so far: old workdirs still restore)."""

    cfg, t = self.cfg, self.cfg.train
    o = cfg.optim
    optimizer, self.schedule = schedules.reference_optimizer(
        o.lr, self.spe * t.epochs, o.warmup_epochs * self.spe, momentum=o.momentum,
        weight_decay=o.weight_decay, warmup_start_lr=o.warmup_start_lr, min_lr=o.min_lr,
        extensions=self.phases)
    if self.phases:
      for line in self.schedule.describe(self.spe):
        self.log(line)
    backbone = self._build_backbone()
    self.model = model = ssl_model.build_pretraining_model(
        cfg.model, cfg.loss, sync_bn=cfg.model.sync_bn and self.replicas > 1,
        vector_logs=distribute.is_multi_worker(self.strategy),
        probe_classes=self.source.num_classes if t.online_probe else 0,
        backbone=backbone)
    if t.mixed_precision == "float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=self.jit["jit_compile"])
    tracked = dict(encoder=model.encoder, projector=model.projector,
                   loss_state=model.loss_layer, optimizer=optimizer, step=model.step_counter)
    if self.jax:   # Keras variables that are not TensorFlow's: mirrored (keras_state.py)
      tracked = keras_state.mirrored(tracked)
    if model.probe_head is not None:
      model.probe_optimizer.learning_rate = t.online_probe_lr
      tracked.update(probe_head=model.probe_head, probe_optimizer=model.probe_optimizer)
    return tracked

  def _choose_jit(self):
    """XLA for the step or not: given, as the workdir's first run chose, or measured
    (xla_choice.py); one line says which and why."""
    why_not = ""
    if self.jax:
      choice = {"jit_compile": True, "how": "backend",
                "why": "JAX compiles every step with XLA"}
      self.log(xla_choice.describe(choice))
      return choice
    if self.given_backbone is not None:
      why_not = "a backbone passed as a Python object is not timed; --jit_compile decides"
    elif distribute.is_multi_worker(self.strategy):
      why_not = "several workers are not timed; --jit_compile decides"
    choice = xla_choice.choose(self.cfg, self.workdir, total_steps=self.total_steps,
                               per_replica_batch=self.cfg.train.batch_size // self.replicas,
                               measurable=not why_not, why_not=why_not, chief=self.chief)
    self.log(xla_choice.describe(choice))
    return choice

  def _build_backbone(self):
    """The given backbone or the config's, checked against the image size and the
    workdir's earlier architecture; records what rebuilds it (architecture.json)."""

    d, m = self.cfg.data, self.cfg.model
    given = self.given_backbone
    if given is not None and not isinstance(given, keras.Model):
      given = given()
    if given is not None:
      backbone = given
      factory.check_input_size(backbone, d.image_size, backbone.name, "backbone")
    else:
      backbone = factory.build(m, image_size=d.image_size,
                               sync_batch_norm=m.sync_bn and self.replicas > 1)
    self.architecture = factory.architecture(backbone)
    saved = self.workdir.read_json(factory.ARCHITECTURE_FILE)
    if (saved is not None and self.workdir.has_checkpoints() and
        not factory.same_architecture(saved, self.architecture, exact=given is None)):
      # The weights would not fit (or, worse, fit another network of the same shapes).
      what = (f"--backbone={m.backbone}" if given is None and not m.backbone_config else
              f"--backbone_config={m.backbone_config}" if given is None else
              f"the backbone {backbone.name!r}")
      raise errors.ConfigError(
          f"{what}: the workdir {self.cfg.train.workdir} was trained with another backbone "
          f"({saved.get('backbone', 'ResNet-%s' % saved.get('depth'))}); use a new "
          "--workdir or the same backbone")
    if self.chief:
      self.workdir.write_json(factory.ARCHITECTURE_FILE, self.architecture)
    return backbone

  def fit(self):
    """Trains from the restored step to the end (or a preemption), stopping with one
    line on a lost worker or a matrix that is no longer positive definite."""
    callbacks, self.preemption = self._callbacks()
    try:
      with self.preemption.installed():
        history = self._fit_epochs(callbacks)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as e:
      if not self.multi_worker:
        raise
      # MultiWorkerMirroredStrategy's heartbeats notice a dead peer within seconds
      # and abort the collectives on every survivor.
      reason = " ".join(e.message.split("}}")[-1].strip().splitlines()[:2])[:240]
      raise errors.WorkerLost(
          f"a worker was lost after step {self._step_now()} ({reason}); the last "
          f"checkpoint ({self._latest_or_none()}) is kept: restart every worker with "
          "the same command to resume") from None
    except tf.errors.InvalidArgumentError as e:
      # Some Cholesky kernels raise instead of returning NaN on a matrix that is
      # not positive definite: the same failure as a non-finite loss.
      if "holesky" not in str(e):
        raise
      raise errors.TrainingStopped(
          f"R + eps*I is not positive definite after step {self._step_now()}: training "
          f"stopped; the last good checkpoint in {self.cfg.train.workdir} is kept "
          "(lower --lr or raise --eps)") from None
    if self.preemption.stopped:
      raise errors.Preempted(
          f"stopped by signal {self.preemption.signal_name}: checkpoint saved at step "
          f"{self.preemption.saved_step} in {self.cfg.train.workdir}; rerun the same "
          "command to resume")
    self.summary.update(final_terms=_final_terms(history),
                        images_per_second=self.throughput.images_per_second())
    if self.knn is not None and self.knn.last:
      self.summary["knn"] = self.knn.last
    warnings = list(self.flat_start.warnings) if self.flat_start is not None else []
    if self.monitor is not None:
      self.summary["monitor"] = self.monitor.last
      warnings += self.monitor.warnings[-10:]
    if self.monitor is not None or warnings:
      # An earlier stage's warnings (before an extension) stay: they describe the run.
      earlier = [w for w in self.previous.get("health_warnings", [])
                 if int((re.match(r"step (\d+):", w) or [0, 0])[1]) <= self.step]
      self.summary["health_warnings"] = earlier + [f"step {s}: {m}" for s, m in warnings]

  def _step_now(self):
    return int(self.model.step_counter.numpy())

  def _latest_or_none(self):
    return tf.train.latest_checkpoint(self.workdir.join("checkpoints")) or "none yet"

  def _fit_epochs(self, callbacks):
    step, spe = self.step, self.spe
    history = None
    if step % spe:
      self._wait_for_data_service()
      # Stopped mid-epoch (preemption): finish that epoch first, its means continued
      # from those saved with the checkpoint.
      restore = callbacks_lib.RestoreEpochTerms(self._saved_epoch_terms(step))
      history = self.model.fit(
          self._dataset_from(step), epochs=step // spe + 1, initial_epoch=step // spe,
          steps_per_epoch=spe - step % spe, callbacks=[restore, *callbacks], verbose=0,
          shuffle=False)
      step = self._step_now()
    if step < self.total_steps and not self.preemption.stopped:
      self._wait_for_data_service()
      history = self.model.fit(
          self._dataset_from(step), epochs=self.total_epochs, initial_epoch=step // spe,
          steps_per_epoch=spe, callbacks=callbacks, verbose=0, shuffle=False)
    return history

  def _save_epoch_terms(self, step):
    """With a mid-epoch (preemption) checkpoint: the epoch's running means so far."""
    if self.chief:
      self.workdir.write_json(os.path.join("checkpoints", EPOCH_TERMS_FILE), dict(
          step=step, terms=callbacks_lib.tracker_state(self.model)))

  def _saved_epoch_terms(self, step):
    """The epoch means saved with the checkpoint of `step`, or None."""
    saved = self.workdir.read_json(os.path.join("checkpoints", EPOCH_TERMS_FILE))
    if not saved or saved.get("step") != step:
      return None
    return saved["terms"]

  def _wait_for_data_service(self):
    if self.cfg.data.data_service and not getattr(self, "_service_ready", False):
      data_lib.wait_for_service_worker(self.cfg.data.data_service, self.log)
      self._service_ready = True

  def _dataset_from(self, start_step):
    """The same stream as an uninterrupted run, from its start_step-th batch on. Each
    worker builds its own pipeline and decodes and augments only its part of each
    global batch (tf.data's auto-sharding would have every worker process all of it)."""
    cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
    if d.data_service:
      # A job per launch and start: a resumed or retried run must not join the job of
      # an earlier process, which has moved past the checkpoint. The workers of one
      # run agree on the chief's number.
      launch = distribute.value_of_first_replica(
          self.strategy, random.SystemRandom().randrange(1, 2**62))
      job = "corinfomax_tf-%s-%d-%d" % (
          hashlib.sha1(os.path.realpath(t.workdir).encode()).hexdigest()[:12], launch,
          start_step)
      return self.strategy.distribute_datasets_from_function(
          lambda input_context: data_lib.service_two_view_dataset(
              self.source, service=d.data_service, job_name=job,
              global_batch_size=t.batch_size, image_size=d.image_size,
              views=(cfg.augment.view1, cfg.augment.view2), mean=d.mean, std=d.std,
              seed=t.seed, skip_batches=start_step, input_context=input_context))
    return self.strategy.distribute_datasets_from_function(
        lambda input_context: data_lib.two_view_dataset(
            self.source, global_batch_size=t.batch_size, image_size=d.image_size,
            views=(cfg.augment.view1, cfg.augment.view2), mean=d.mean, std=d.std,
            seed=t.seed, shuffle_buffer=d.shuffle_buffer, deterministic=t.deterministic,
            skip_batches=start_step, input_context=input_context))

  def _callbacks(self):
    """Guards first, then loggers and monitors, the checkpoint saver last (after the
    monitors of an epoch's last step have run)."""

    t, workdir = self.cfg.train, self.workdir
    self.throughput = callbacks_lib.Throughput(t.batch_size)
    preemption = callbacks_lib.PreemptionSaver(self.checkpoints,
                                               on_save=self._save_epoch_terms)
    cbs = [callbacks_lib.FiniteLossGuard(t.workdir)]
    self.flat_start = None
    if self.step == 0 and self.chief:
      self.flat_start = callbacks_lib.FlatStartWarning(log=self.log)
      cbs.append(self.flat_start)
    if t.loss_spike_factor:
      cbs.append(callbacks_lib.LossSpikeGuard(t.loss_spike_factor, t.loss_spike_window,
                                              t.workdir))
    cbs += [self.throughput, preemption]
    self.monitor = self.knn = None
    if self.chief:
      cbs.append(callbacks_lib.ScalarLogger(workdir.join("train"), t.log_every_steps,
                                            t.batch_size, self.schedule))
      if t.monitor_every_steps:
        self.monitor = monitoring.TrainingMonitor(workdir.join("train"),
                                                  t.monitor_every_steps,
                                                  t.collapse_rank_share)
        cbs.append(self.monitor)
      if self.step == 0 and self.flagfile_text:
        with tf.summary.create_file_writer(workdir.join("train")).as_default(step=0):
          tf.summary.text("config/flags", "```\n" + self.flagfile_text + "```")
    cbs.append(callbacks_lib.CheckpointSaver(self.checkpoints))
    if t.knn_every_epochs and self.chief and self.eval_source is not None:
      e = self.eval_source
      self.knn = callbacks_lib.KNNMonitor(
          self._eval_split(e.train), self._eval_split(e.test), e.num_classes,
          t.knn_every_epochs, t.knn_k, t.knn_temperature, workdir.join("eval"))
      cbs.append(self.knn)
    verbose = (1 if sys.stdout.isatty() else 2) if t.verbose == "auto" else int(t.verbose)
    if verbose and self.chief:
      cbs.append(callbacks_lib.ProgressBar(self.total_epochs, self.spe, t.batch_size,
                                           interactive=verbose == 1))
    return cbs + self.extra_callbacks, preemption

  def _eval_split(self, split):
    d = self.cfg.data
    return data_lib.eval_dataset(split, batch_size=256, image_size=d.image_size,
                                 mean=d.mean, std=d.std)

  def _set_aside_earlier_results(self):
    """Results of an earlier step (a probe or export this run did not redo, e.g.
    after --extend_epochs with --probe_epochs=0 or --noexport) leave the top level of
    the summary for `earlier`, each with its step, and the output says so."""
    step, previous_step = self.summary["step"], self.previous.get("step")
    earlier = dict(self.summary.pop("earlier", {}))
    moved = []
    for key, companions in (("probe", ("probe_dataset",)), ("random_probe", ()),
                            ("export", ())):
      if key not in self.summary:
        continue
      at = self.summary.get(f"{key}_step", previous_step)
      if at == step:
        continue
      earlier[key] = self.summary.pop(key)
      earlier[f"{key}_step"] = at
      self.summary.pop(f"{key}_step", None)
      for name in companions:
        if name in self.summary:
          earlier[name] = self.summary.pop(name)
      moved.append(f"{key} (step {at})")
    if earlier:
      self.summary["earlier"] = earlier
    if moved:
      self.log(f"Not redone at step {step}: {', '.join(moved)}; summary.json keeps "
               "them under 'earlier' with the step they belong to (--probe_epochs, "
               "--export redo them)")

  def export(self):
    """The encoder of the last checkpoint, exported and checked (SavedModel, preset)."""
    t = self.cfg.train
    export_dir = t.export_dir or self.workdir.join("export")
    self.summary["export_step"] = self.summary["step"]
    if (saved_model.is_our_export(export_dir) and
        saved_model.read_metadata(export_dir)["step"] == self.summary["step"]):
      self.summary["export"] = export_dir
      return
    if self.jax:   # the export is TensorFlow's: a TensorFlow-backend process writes it
      path, step = saved_model.export_workdir_in_tensorflow(
          t.workdir, export_dir, onnx=t.export_runtimes, litert=t.export_runtimes,
          log=self.log)
    else:
      path, step = saved_model.export_workdir(t.workdir, export_dir, overwrite=True,
                                              onnx=t.export_runtimes,
                                              litert=t.export_runtimes, log=self.log)
    self.summary["export"] = export_dir
    self.log(f"Exported step {step} to {path}; {export_dir} -> it; reload check passed")
    self.log(saved_model.files_line(path))

  def evaluate(self):
    """The quick linear probe of the trained (and of a random) encoder, on the chief."""

    t, e = self.cfg.train, self.eval_source
    if self.no_eval_reason:
      self.summary["probe_skipped"] = self.no_eval_reason
    if not (t.probe_epochs and self.chief and e is not None):
      return

    def probe(encoder):
      return probes.probe_encoder(encoder, self._eval_split(e.train),
                                  self._eval_split(e.test), e.num_classes,
                                  epochs=t.probe_epochs, seed=t.seed)
    self.summary["probe_dataset"] = self.cfg.data.eval_dataset or self.cfg.data.dataset
    self.summary["probe_step"] = self.summary["step"]
    self.summary["probe"] = probe(self.model.features)
    self.log(f"Linear probe, pretrained encoder: top-1 {self.summary['probe']['top1']:.2f}%")
    if t.probe_random:
      random_encoder = pooling.pooled_model(factory.random_encoder(
          self.architecture, t.seed + 1, name="random_encoder"))
      self.summary["random_probe"] = probe(random_encoder)
      self.summary["random_probe_step"] = self.summary["step"]
      self.log(f"Linear probe, random encoder:     top-1 "
               f"{self.summary['random_probe']['top1']:.2f}%")
    writer = tf.summary.create_file_writer(self.workdir.join("eval"))
    with writer.as_default(step=self.summary["step"]):
      for key in ("probe", "random_probe"):
        for metric, value in self.summary.get(key, {}).items():
          tf.summary.scalar(f"{key}/{metric}", value)
    writer.flush()

  def summarise(self):
    self._set_aside_earlier_results()
    if self.chief:
      self.workdir.write_json(SUMMARY_FILE, self.summary)
      self.log(json.dumps(self.summary, sort_keys=True))
    return self.summary


def _kind_of(default):
  """(test, what it is) for a setting whose train-flag default is `default`."""
  if isinstance(default, bool):
    return (lambda v: isinstance(v, bool)), "True or False"
  if isinstance(default, int):
    return (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)), \
        "an integer"
  if isinstance(default, float):
    return (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)), "a number"
  if isinstance(default, (list, tuple)):
    return (lambda v: isinstance(v, (str, list, tuple))), "a list (or a comma-separated str)"
  if isinstance(default, str):
    return (lambda v: isinstance(v, str)), "a str"
  return (lambda v: True), "anything"


def check_setting_types(settings, defaults):
  """Each setting of `pretrain` (and `sweep`) must have the type of its train flag:
  a TypeError naming the argument otherwise (before: `lr="fast"` failed deep inside
  with "'>' not supported between 'str' and 'float'")."""
  for name, value in settings.items():
    if name not in defaults or defaults[name] is None:
      continue
    ok, what = _kind_of(defaults[name])
    if not ok(value):
      raise TypeError(f"{name} must be {what} (as the train command's --{name}). "
                      f"Received: {name}={value!r}")


def pretrain(backbone, images, *, workdir, image_size, epochs, batch_size,
             normalization="imagenet", export=True, log=print, **settings):
  """Pretrains `backbone` on `images` with the full lifecycle of the `train` command.

  The workdir is locked for the run; the config is saved and checked on a rerun
  (which resumes exactly from the newest intact checkpoint); the non-finite-loss
  guard, preemption handling (SIGTERM/SIGINT: checkpoint, then
  `errors.Preempted`), TensorBoard logs and health monitors run as they do for the
  command; the encoder is exported at the end (SavedModel, and a keras-hub preset
  where the backbone is a keras-hub `Backbone`).

  Args:
    backbone: a keras.Model taking normalised images (any keras-hub backbone, ours,
      or your own), or a function of no arguments returning one (called inside the
      strategy's scope: needed with `strategy="mirrored"`).
    images: a finite tf.data.Dataset of single images (uint8 (H, W, 3), (image,
      label) pairs or {"image", "label"} dicts; labels are not used). The
      end-of-training probe runs on a labelled set named by `eval_dataset`
      ("digits", "folder" with `eval_data_dir`, or a tensorflow-datasets name).
    workdir: the directory of checkpoints, logs, config and summary.
    image_size: the side of the square training views.
    epochs: the length of training.
    batch_size: the global batch.
    normalization: "imagenet", "cifar10", "cifar100", "digits" or (mean, std).
    export: export the encoder to <workdir>/export at the end.
    log: where progress lines go.
    **settings: any other setting of the `train` command by its flag name
      (`lr`, `alpha`, `projector`, `steps_per_epoch`, `seed`, `strategy`,
      `probe_epochs`, ...); `corinfomax train --helpfull` lists them.

  Returns:
    The summary dict (also in <workdir>/summary.json): final loss terms, steps,
    probe top-1 where there are labels, the export's path.

  Example:
  ```python
  images = tf.data.Dataset.from_tensor_slices(uint8_images)   # (N, 32, 32, 3)
  summary = corinfomax_tf.pretrain(backbone, images, workdir="runs/mine",
                                   image_size=32, epochs=100, batch_size=256)
  encoder = tf.saved_model.load(summary["export"])
  ```
  """

  values = flags_lib.defaults()
  unknown = sorted(set(settings) - set(values))
  if unknown:
    raise ValueError(f"Unknown settings {unknown}: pass flags of the train command by "
                     f"name. Received: {', '.join(f'{k}={settings[k]!r}' for k in unknown)}")
  if "verbose" in settings and isinstance(settings["verbose"], int):
    settings["verbose"] = str(settings["verbose"])
  check_setting_types(dict(settings, image_size=image_size, epochs=epochs,
                           batch_size=batch_size, export=export), values)
  if not isinstance(workdir, (str, os.PathLike)):
    raise TypeError(f"workdir must be a path. Received: workdir={workdir!r}")
  workdir = os.fspath(workdir)
  for name in ("dataset", "data_dir", "normalization"):
    if name in settings:
      raise ValueError(f"{name} is given by `images` and `normalization` here. "
                       f"Received: {name}={settings[name]!r}")
  mean, std = data_lib.normalization_of(normalization)
  values.update(settings, workdir=workdir, image_size=image_size, epochs=epochs,
                batch_size=batch_size, export=export,
                normalization=normalization if isinstance(normalization, str) else "auto")
  values.update(probe_random=settings.get("probe_random", False))
  cfg = config_lib.from_flags(types.SimpleNamespace(**values))
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, dataset="python", mean=tuple(mean), std=tuple(std)))
  source = data_lib.source_from_dataset(images)
  return PretrainingJob(cfg, log=log, backbone=backbone, source=source).run()
