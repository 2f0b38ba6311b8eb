"""A hyperparameter sweep: Optuna trials, each an ordinary pretraining workdir.

    summary = Sweep(cfg, log=print).run()

`cfg` is a validated `config.SweepConfig`. Every trial is `<workdir>/trials/<n>`, run
by the train command's `PretrainingJob` (lock, exact resume, guards, TensorBoard,
export); its score is the kNN top-1 on a seeded validation split carved from the
training images (or, without labels, the effective rank of R), reported each epoch
to the pruner. Many processes (on one host or many, sharing the sweep directory and
`--storage`) take trials from one study:

* a new trial is asked for, and its directory claimed, under `<workdir>/.ask.lock`,
  so `n_trials` is never exceeded and no trial is run twice;
* a trial's directory holds `.sweep.lock` (flock) while a process runs it: a
  running trial whose lock is free was left by a process that died, and the next
  process to look takes it over and resumes it from its checkpoint.
"""

import contextlib
import dataclasses
import fcntl
import gc
import json
import os
import socket
import types

import keras
import optuna
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from corinfomax_tf import config as config_lib
# The sweep's checked config, built before TensorFlow starts (the command's edge).
from corinfomax_tf.config import sweep_config  # noqa: F401
from corinfomax_tf import errors
from corinfomax_tf import flags as flags_lib
from corinfomax_tf.data import datasets as data_lib
from corinfomax_tf.evaluation import monitoring
from corinfomax_tf.training import pretraining
from corinfomax_tf.tuning import report
from corinfomax_tf.tuning import space as space_lib
from corinfomax_tf.tuning import study as study_lib

ASK_LOCK = ".ask.lock"
CLAIM_LOCK = ".sweep.lock"
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
           optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)


class Pruned(Exception):
  """Raised inside a trial's training to stop it; carries the reason."""


@contextlib.contextmanager
def _flock(path):
  with open(path, "a+") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(fh, fcntl.LOCK_UN)


def _try_claim(directory):
  """An open, flock'ed `.sweep.lock` of `directory`, or None if a live process holds
  it. The kernel (or NFS server) releases it when its holder dies."""
  os.makedirs(directory, exist_ok=True)
  fh = open(os.path.join(directory, CLAIM_LOCK), "a+")
  try:
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    fh.close()
    return None
  return fh


def _release(fh):
  fcntl.flock(fh, fcntl.LOCK_UN)
  fh.close()


def score_name(cfg, labelled):
  """The score trials are compared on, and what it is, for the output."""
  score = cfg.score
  if score == "auto":
    score = "knn" if labelled else "effective_rank"
  if score == "knn":
    k = cfg.train["knn_k"][0]
    return score, f"k{int(k)}_top1", (
        f"kNN top-1 (k={int(k)}) on the validation split, in %")
  return score, "effective_rank", (
      "effective rank of the covariance R at the end of training (needs no labels; a "
      "trial that spreads its features over more dimensions scores higher; it says "
      "nothing of classes)")


def effective_rank_of(model):
  """Mean effective rank of the loss layer's covariance matrices."""
  layer = model.loss_layer
  ranks = [monitoring.effective_rank(monitoring.eigenvalues(getattr(layer, name).numpy()))
           for name in layer.state if name.startswith("R") and name != "R12"]
  return float(sum(ranks) / len(ranks))


class TrialReporter:
  """A Keras callback (made by `callback()`) that reports each epoch's score to the
  Optuna trial and stops training when the pruner or a collapse says so.

  A total collapse (every sample on one point) stops the trial at once; a
  dimensional collapse only once the pruner's warm-up (`after_epochs`) is over and
  while the newest measurement still shows it (early training often passes
  through a low rank and recovers).
  """

  def __init__(self, trial, job, score, prune_collapsed, after_epochs, log):
    self.trial = trial
    self.job = job
    self.score = score      # ("knn", key) or ("effective_rank", key)
    self.prune_collapsed = prune_collapsed
    self.after_epochs = after_epochs
    self.log = log

  def check_collapse(self, model, epoch):
    monitor = self.job.monitor
    if not (self.prune_collapsed and monitor is not None and monitor.warnings):
      return
    step_now = int(model.step_counter.numpy())
    newest = step_now - step_now % monitor.every   # the newest measurement's step
    for step, message in monitor.warnings:
      if "total collapse" in message or (
          step == newest and epoch + 1 > self.after_epochs and "collapse" in message):
        raise Pruned(f"collapsed at step {step}: {message}")

  def callback(self):
    reporter = self

    class _Callback(keras.callbacks.Callback):
      def on_epoch_end(self, epoch, logs=None):
        reporter.epoch_end(self.model, epoch)
    return _Callback()

  def epoch_end(self, model, epoch):
    self.check_collapse(model, epoch)
    kind, key = self.score
    if kind == "knn":
      knn = self.job.knn
      if knn is None or not knn.last or (epoch + 1) % knn.every:
        return
      value = knn.last[key]
    else:
      value = effective_rank_of(model)
    self.trial.report(value, epoch + 1)
    if self.trial.should_prune():
      raise Pruned(f"pruned after epoch {epoch + 1}: score {value:.4g} is below what the "
                   f"{self.trial.study.pruner.__class__.__name__} keeps at that epoch")


class Sweep:
  """One process's part of a sweep (see the module doc). `backbone`, `source`: as
  for `PretrainingJob` (the Python API passes its own)."""

  def __init__(self, cfg, log=print, *, backbone=None, source=None):
    self.cfg = cfg
    self.log = log
    self.backbone = backbone
    self.given_source = source
    self.dir = cfg.workdir
    self.ran = []   # trial numbers this process ran (or resumed)

  # -- set-up ------------------------------------------------------------------

  def prepare(self):
    """Sources, validation split, storage and study; every check before a trial."""
    cfg, t = self.cfg, self.cfg.train
    try:
      os.makedirs(self.dir, exist_ok=True)
    except OSError as e:
      raise errors.WorkdirError(f"--workdir={self.dir}: cannot write there "
                                f"({e.strerror})") from None
    base = config_lib.from_flags(types.SimpleNamespace(**self._trial_values({}, 0)))
    self.source = self.given_source or data_lib.load_source(
        base.data.dataset, **base.data.source_kwargs())
    labelled_eval = None
    if not self.source.labelled and base.data.eval_dataset:
      eval_cfg = base.data.eval_data()
      labelled_eval = data_lib.load_source(eval_cfg.dataset, **eval_cfg.source_kwargs())
    labelled = self.source.labelled or labelled_eval is not None
    self.score_kind, self.score_key, self.score_what = score_name(cfg, labelled)
    if self.score_kind == "knn" and not labelled:
      raise errors.ConfigError(
          "--score=knn: the training images have no labels and no --eval_dataset "
          "names a labelled set; use --score=effective_rank (or auto)")
    self.validation = None
    self.full_source, self.full_eval = self.source, labelled_eval
    self.eval_source = None
    if self.score_kind == "knn":
      if not cfg.validation_fraction:
        raise errors.ConfigError("--validation_fraction=0: a kNN score needs a validation "
                                 "split (the test split is never used for choosing)")
      every = t["knn_every_epochs"] or 1
      if t["epochs"] % every:
        raise errors.ConfigError(
            f"--knn_every_epochs={every}: the sweep scores the final epoch; give a "
            f"divisor of --epochs={t['epochs']}")
      self.knn_every = every
      carved = labelled_eval if labelled_eval is not None else self.source
      held_source, held = data_lib.holdout(carved, cfg.validation_fraction,
                                           cfg.validation_seed)
      if labelled_eval is not None:
        self.eval_source = held_source
      else:
        self.source = held_source
      self.validation = dict(
          fraction=cfg.validation_fraction, seed=cfg.validation_seed, count=len(held),
          carved_from=("--eval_dataset" if labelled_eval is not None else "--dataset")
          + f"'s {base.data.eval_train_split if labelled_eval is not None else base.data.train_split} split",
          indices=[int(i) for i in held])
    self.settings = json.loads(json.dumps(dict(
        search=[p.spec() for p in cfg.search],
        fixed=self._fixed_settings(base),
        score=self.score_kind, score_key=self.score_key,
        validation=None if self.validation is None else
        {k: self.validation[k] for k in ("fraction", "seed", "count")})))
    self.storage_url = cfg.storage or study_lib.default_url(self.dir)
    self.storage = study_lib.open_storage(cfg.storage, self.dir)
    self.study_name = cfg.study or os.path.basename(os.path.normpath(os.path.abspath(self.dir)))
    sampler = study_lib.SeededPerTrial(cfg.sweep_seed, cfg.startup_trials)
    pruner = study_lib.make_pruner(cfg.pruner, after_epochs=cfg.prune_after_epochs,
                                   startup_trials=cfg.pruner_startup_trials,
                                   max_epochs=t["epochs"])
    self.study = study_lib.open_study(self.storage, self.study_name, self.settings,
                                      sampler, pruner, self.storage_url)
    if cfg.try_given:
      self._enqueue_given()
    self.log(f"Sweep {self.study_name!r} in {study_lib.shown_url(self.storage_url)}: "
             f"{cfg.n_trials} trials, score: {self.score_what}")
    if self.validation:
      self.log(f"Validation split: {self.validation['count']} images held out of "
               f"{self.validation['carved_from']} (fraction {cfg.validation_fraction}, "
               f"seed {cfg.validation_seed}); the test split is not used for choosing")

  def _fixed_settings(self, base):
    """What the trials share that changes their scores (by flag name): the train
    command's resume settings, the backbone and the kNN score's settings; the
    searched parameters are not among them."""
    t = self.cfg.train
    fixed = config_lib.pretraining_resume_settings(base)
    fixed.update(backbone=t["backbone"], backbone_config=t["backbone_config"],
                 eval_dataset=t["eval_dataset"], knn_k=list(t["knn_k"]),
                 knn_temperature=t["knn_temperature"])
    searched = {p.name for p in self.cfg.search}
    searched |= {space_lib.DERIVED[n] for n in searched if n in space_lib.DERIVED}
    return {k: v for k, v in sorted(fixed.items()) if k not in searched}

  def _enqueue_given(self):
    """Queues the searched parameters' given values as the study's first trial."""
    given = {}
    for p in self.cfg.search:
      value = (int(str(self.cfg.train["projector"]).split("-")[-1])
               if p.name == "projector_out" else self.cfg.train[p.name])
      inside = (value in p.choices if p.kind == "choice" else p.low <= value <= p.high)
      if not inside:
        self.log(f"The given --{p.name}={value} is outside --search={p.spec()}: no "
                 "trial of the given settings")
        return
      given[p.name] = value
    with _flock(os.path.join(self.dir, ASK_LOCK)):
      if not self.study.get_trials(deepcopy=False):
        self.study.enqueue_trial(given, user_attrs={"given": True})

  def _trial_values(self, sampled, number):
    values = space_lib.apply(self.cfg.train, sampled)
    values.update(workdir=self.trial_dir(number), export_dir="")
    if getattr(self, "score_kind", None) == "knn":
      values["knn_every_epochs"] = self.knn_every
    return values

  def trial_dir(self, number):
    return os.path.join(self.dir, "trials", str(number))

  # -- the loop ----------------------------------------------------------------

  def run(self):
    """Runs trials until the study has `n_trials`; returns the summary dict."""
    self.prepare()
    while True:
      claimed = self._next_trial()
      if claimed is None:
        break
      trial, claim, adopted = claimed
      try:
        self._run_trial(trial, adopted)
      finally:
        _release(claim)
    return self.finish()

  def _next_trial(self):
    """(trial, claim, adopted) for this process to run, or None when the study has
    its trials (others may still be running them)."""
    with _flock(os.path.join(self.dir, ASK_LOCK)):
      running = self.study.get_trials(deepcopy=False,
                                      states=(optuna.trial.TrialState.RUNNING,))
      for frozen in running:
        claim = _try_claim(self.trial_dir(frozen.number))
        if claim is None:
          continue   # a live process runs it
        owner = frozen.user_attrs.get("owner", {})
        has_checkpoint = os.path.isdir(os.path.join(self.trial_dir(frozen.number),
                                                    "checkpoints"))
        self.log(f"Trial {frozen.number} was left running by {owner.get('host', '?')} "
                 f"pid {owner.get('pid', '?')}, which is gone: "
                 + ("resuming it from its checkpoint" if has_checkpoint else
                    "running it again from the start (it saved no checkpoint)"))
        trial = optuna.trial.Trial(self.study, frozen._trial_id)
        self._own(trial)
        return trial, claim, True
      counted = self.study.get_trials(deepcopy=False, states=COUNTED)
      if len(counted) >= self.cfg.n_trials:
        return None
      trial = self.study.ask()
      claim = _try_claim(self.trial_dir(trial.number))
      if claim is None:   # a leftover directory some live process uses: not ours
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise errors.WorkdirError(
            f"{self.trial_dir(trial.number)}: in use by another process that is not part "
            f"of the study {self.study_name!r}; use a new --workdir or --study")
      self._own(trial)
      return trial, claim, False

  def _own(self, trial):
    trial.set_user_attr("owner", dict(host=socket.gethostname(), pid=os.getpid()))
    trial.set_user_attr("workdir", os.path.join("trials", str(trial.number)))

  def _run_trial(self, trial, adopted):

    n = trial.number
    self.ran.append(n)
    sampled = {p.name: space_lib.suggest(trial, p) for p in self.cfg.search}
    values = self._trial_values(sampled, n)
    shown = ", ".join(f"{k}={_short(v)}" for k, v in sampled.items())
    self.log(f"Trial {n}{' (resumed)' if adopted else ''}: {shown}")
    try:
      cfg = config_lib.from_flags(types.SimpleNamespace(**values))
    except errors.ConfigError as e:
      trial.set_user_attr("reason", f"settings refused: {e}")
      self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
      self.log(f"Trial {n} pruned: its settings are refused ({e})")
      return
    keras.backend.clear_session()
    gc.collect()
    reporter = TrialReporter(trial, None, (self.score_kind, self.score_key),
                             self.cfg.prune_collapsed, self.cfg.prune_after_epochs,
                             self.log)

    def log(line):
      self.log(f"[trial {n}] {line}")
    job = pretraining.PretrainingJob(
        cfg, flags_lib.flagfile_text(values), log=log, backbone=self.backbone,
        source=self.source, eval_source=self.eval_source,
        callbacks=[reporter.callback()])
    reporter.job = job
    try:
      summary = job.run()
    except Pruned as e:
      self._prune(trial, str(e))
      return
    except errors.TrainingStopped as e:
      self._prune(trial, f"training stopped: {e}")
      return
    except errors.Preempted:
      raise   # the trial stays running; a rerun resumes it
    except errors.UserError as e:
      trial.set_user_attr("reason", str(e))
      self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
      raise
    except BaseException as e:
      # A bug (or an interrupt): mark it so that it does not count, then surface it.
      if isinstance(e, Exception):
        trial.set_user_attr("reason", f"{type(e).__name__}: {e}"[:500])
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
      raise
    value = self._final_score(job, summary)
    self._write_hparams(n, sampled, value)
    self.study.tell(trial, value, skip_if_finished=True)
    self.log(f"Trial {n} finished: {self.score_key} {value:.4f}")

  def _prune(self, trial, reason):
    trial.set_user_attr("reason", reason)
    self.study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
    self.log(f"Trial {trial.number} pruned: {reason}")

  def _final_score(self, job, summary):
    if self.score_kind == "knn":
      return float(summary["knn"][self.score_key])
    return effective_rank_of(job.model)

  def _write_hparams(self, number, sampled, value):
    """The trial's parameters and score for TensorBoard's HParams dashboard."""
    writer = tf.summary.create_file_writer(self.trial_dir(number))
    with writer.as_default(step=0):
      hp.hparams({k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for k, v in sampled.items()}, trial_id=f"trial {number}")
      tf.summary.scalar("sweep/score", value)
    writer.flush()

  # -- results ----------------------------------------------------------------

  def finish(self):
    with _flock(os.path.join(self.dir, ASK_LOCK)):
      return report.write_results(self)


def _short(value):
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def sweep(search, *, workdir, n_trials=20, backbone=None, images=None, log=print,
          **settings):
  """Runs (or continues) a hyperparameter sweep, as `corinfomax sweep` does.

  Every trial is a pretraining workdir `<workdir>/trials/<n>` with the train
  command's lifecycle; trials are scored on a seeded validation split carved from
  the training images (kNN top-1; without labels the effective rank of R) and
  pruned early from their per-epoch scores. Rerunning continues the study;
  several processes (hosts) with the same `workdir`, `storage` and `study` share it.

  Args:
    search: the search space, one string per parameter in the `--search` syntax:
      "alpha:log:50:2000", "la_R:log:0.001:0.1", "projector_out:choice:64,128".
    workdir: the sweep directory (trials, study.db, sweep.json, best.cfg, plots).
    n_trials: trials in the whole study.
    backbone: optional, as for `pretrain` (a keras.Model or a function returning
      one, rebuilt per trial: pass a function).
    images: optional tf.data.Dataset of (image, label) pairs or images to sweep on
      instead of `dataset` (unlabeled images: the score is the effective rank).
    log: where progress lines and the table go.
    **settings: the sweep's settings (`storage`, `study`, `score`,
      `validation_fraction`, `validation_seed`, `pruner`, `prune_after_epochs`,
      `startup_trials`, `sweep_seed`, ...) and any train flag by name (`epochs`,
      `batch_size`, `dataset`, ...), fixed for every trial.

  Returns:
    The sweep.json dict: every trial (parameters, score, state, workdir), the best
    trial and its flagfile, the test-split figure of the best trial.

  Example:
  ```python
  result = corinfomax_tf.sweep(
      ["alpha:log:50:2000", "lr:log:0.05:1"], workdir="runs/sweep", n_trials=20,
      dataset="digits", image_size=16, normalization="digits", epochs=10,
      batch_size=128)
  print(result["best"]["params"], result["best"]["flagfile"])
  ```
  """
  values = flags_lib.defaults()
  sweep_fields = {f.name for f in dataclasses.fields(config_lib.SweepConfig)}
  train = {k: v for k, v in settings.items() if k in values}
  own = {k: v for k, v in settings.items() if k not in values}
  unknown = sorted(set(own) - sweep_fields)
  if unknown:
    raise ValueError(f"Unknown settings {unknown}: pass sweep settings or flags of the "
                     "train command by name. Received: "
                     + ", ".join(f"{k}={own[k]!r}" for k in unknown))
  if isinstance(search, str):
    raise TypeError(f"search must be a list of strings such as ['alpha:log:50:2000']. "
                    f"Received: search={search!r}")
  pretraining.check_setting_types(train, values)
  pretraining.check_setting_types(
      dict(own, n_trials=n_trials),
      {f.name: f.default for f in dataclasses.fields(config_lib.SweepConfig)})
  values.update(train, workdir=os.fspath(workdir))
  cfg = sweep_config(values, search, n_trials=n_trials, **own)
  source = None if images is None else data_lib.source_from_dataset(images)
  return Sweep(cfg, log=log, backbone=backbone, source=source).run()
