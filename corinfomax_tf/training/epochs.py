"""The lifecycle of a command that trains in whole epochs (linear evaluation,
fine-tuning, detection), on top of the workdir layer.

    with EpochRun.open(cfg, command="linear_eval", result_file="linear_eval.json") as run:
      if run.finished is not None:
        return run.finished                        # "already finished"
      start = run.restore(head=head, optimizer=optimizer)   # newest intact checkpoint
      for epoch in range(start + 1, cfg.epochs + 1):
        ...                                        # a function of (seed, epoch) alone
        run.end_epoch(epoch, progress)             # progress, then the checkpoint
      return run.finish(result)                    # atomic result file

The workdir is locked and proven writable; the config is saved to config.json and
a resume whose settings differ (`cfg.RESUME_KEYS`) is refused naming the flag. What
an epoch adds to the result (history, first losses) is kept in progress.json, written
before that epoch's checkpoint; on resume it is cut back to the restored epoch, so a
kill between the two loses nothing and repeats nothing.
"""

import contextlib

import tensorflow as tf

from corinfomax_tf import config as config_lib
from corinfomax_tf import errors
from corinfomax_tf.training import workdir as workdir_lib

PROGRESS_FILE = "progress.json"
# config.json's record of the encoder's weights (fingerprints.weights_digest) and step.
ENCODER_KEY = "encoder_identity"


def _check_same_encoder(saved, current, cfg, workdir):
  if not saved or not current or saved.get("weights") == current.get("weights"):
    return
  raise errors.ConfigError(
      f"--encoder={cfg.encoder}: holds other weights (step {current.get('step')}) than "
      f"the encoder the workdir {workdir.path} was computed from (step "
      f"{saved.get('step')}); use a new {workdir.flag} for this encoder, or the "
      "same encoder")


class EpochRun:
  """See the module docstring."""

  def __init__(self, workdir, cfg, result_file):
    self.workdir = workdir
    self.cfg = cfg
    self.result_file = result_file
    self.progress = {}
    self.checkpoints = None
    self._epoch = None

  @classmethod
  @contextlib.contextmanager
  def open(cls, cfg, *, command, result_file, flag="--workdir", log=print, encoder=None):
    """`encoder`: what identifies the encoder the result is computed from
    ({"weights": digest, "step": step}); a workdir whose checkpoints or result were
    computed from other weights is refused, whatever path the encoder has now."""
    with workdir_lib.Workdir(cfg.workdir, flag=flag, command=command, log=log) as workdir:
      saved = workdir.read_json("config.json")
      current = config_lib.as_dict(cfg)
      if saved is not None and (workdir.has_checkpoints() or
                                workdir.read_json(result_file) is not None):
        workdir.check_compatible(config_lib.resume_settings(saved, cfg.RESUME_KEYS),
                                 config_lib.resume_settings(current, cfg.RESUME_KEYS))
        _check_same_encoder(saved.get(ENCODER_KEY), encoder, cfg, workdir)
      if encoder is not None:
        current[ENCODER_KEY] = encoder
      workdir.write_json("config.json", current)
      yield cls(workdir, cfg, result_file)

  @property
  def finished(self):
    """The result of a run that already trained every epoch, or None."""
    result = self.workdir.read_json(self.result_file)
    if result is not None and result.get("epochs") == self.cfg.epochs:
      return result
    return None

  def restore(self, **tracked):
    """Tracks `tracked` (and the epoch) in the workdir's checkpoints, restores the
    newest intact one; returns the number of epochs already trained."""
    self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    self.checkpoints = self.workdir.checkpoints(
        tf.train.Checkpoint(**tracked, epoch=self._epoch), keep=self.cfg.keep_checkpoints)
    restored = self.checkpoints.restore_latest()
    done = int(self._epoch.numpy())
    if restored:
      self.workdir.log(f"Resumed from {restored} (epoch {done})")
    progress = self.workdir.read_json(PROGRESS_FILE) or {}
    if done:
      self.progress = {k: v for k, v in progress.items() if k != "history"}
      self.progress["history"] = [h for h in progress.get("history", [])
                                  if h["epoch"] <= done]
    return done

  def record(self, epoch, **values):
    """Adds one evaluation (epoch and values) to the history of progress.json."""
    self.progress.setdefault("history", []).append(dict(epoch=epoch, **values))

  def last_record(self):
    """The values of the latest evaluation in the history (without its epoch)."""
    history = self.progress.get("history") or [{}]
    return {k: v for k, v in history[-1].items() if k != "epoch"}

  def end_epoch(self, epoch):
    """Writes progress.json, then the epoch's checkpoint."""
    self.workdir.write_json(PROGRESS_FILE, self.progress)
    self._epoch.assign(epoch)
    self.checkpoints.save(epoch)

  def finish(self, result):
    """The final result (with the history), written atomically; returned."""
    result = {**self.progress, **result, "epochs": self.cfg.epochs}
    self.workdir.write_json(self.result_file, result)
    return result
