"""The workdir of a command that trains: one lifecycle for every such command.

    with Workdir(path, flag="--workdir", command="train") as wd:
      saved = wd.read_json("config.json")          # the previous run's config, or None
      wd.write_json("config.json", cfg.to_dict())  # atomic
      ckpts = wd.checkpoints(tf.train.Checkpoint(...), keep=3)
      restored = ckpts.restore_latest()           # newest intact checkpoint, or None
      ...
      ckpts.save(step)
      wd.write_json("summary.json", result)

A `Workdir`
* is created and proven writable before any work starts;
* is locked for the life of the process: a second live process on the same workdir
  stops at once with one line naming the holder (host, pid, start time); a lock left
  by a process that died is taken over with one line saying so. The lock is an
  `fcntl.flock` on `<workdir>/.lock`, which the kernel (or the NFS server) releases
  when its process dies; the file records who holds it. Only the chief of a
  multi-worker run takes it: the run is one holder;
* writes files atomically (a reader never sees half of one);
* owns the checkpoint manager (`Checkpoints`), whose restore falls back from a
  damaged checkpoint to the newest intact one.
"""

import datetime
import errno
import fcntl
import gc
import glob
import json
import os
import re
import shutil
import socket

import numpy as np
import tensorflow as tf

from corinfomax_tf import errors
from corinfomax_tf.atomic_files import write_atomic

LOCK_FILE = ".lock"
DAMAGED_DIR = "damaged"
# Room for TensorBoard logs, the resolved flags, reports and results.
LOG_BYTES_MARGIN = 64 * 2**20


class Workdir:
  """A locked, proven-writable directory for one command's run (see module doc)."""

  def __init__(self, path, *, flag="--workdir", command="", lock=True, log=print):
    self.path = path
    self.flag = flag
    self.command = command
    self.take_lock = lock
    self.log = log
    self._lock_fh = None

  # -- life cycle ------------------------------------------------------------

  def __enter__(self):
    self.open()
    return self

  def __exit__(self, *exc):
    self.close()

  def open(self):
    self._prove_writable()
    if self.take_lock:
      self._lock()
    return self

  def close(self):
    if self._lock_fh is not None:
      # Emptied, not removed: a process that opened the file meanwhile must find the
      # same file to lock. An empty file means "released cleanly".
      self._lock_fh.seek(0)
      self._lock_fh.truncate()
      fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
      self._lock_fh.close()
      self._lock_fh = None

  def _prove_writable(self):
    try:
      os.makedirs(self.path, exist_ok=True)
      # One name per process: the workers of a multi-worker run share the workdir
      # and prepare it at the same moment.
      probe = self.join(f".write_test.{socket.gethostname()}.{os.getpid()}")
      with open(probe, "w") as fh:
        fh.write("ok")
      os.remove(probe)
    except OSError as e:
      raise errors.WorkdirError(
          f"{self.flag}={self.path}: cannot write there ({e.strerror})") from None

  def _lock(self):
    fh = open(self.join(LOCK_FILE), "a+")
    try:
      fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        fh.close()
        # A file system without locks (some NFS mounts answer ENOLCK).
        raise errors.WorkdirError(
            f"{self.flag}={self.path}: cannot be locked ({e.strerror}); use a workdir on "
            "a file system with locks") from None
      holder = _read_holder(fh)
      fh.close()
      raise errors.WorkdirError(
          f"{self.flag}={self.path}: in use by another live process ({_describe(holder)}); "
          "wait for it to end, stop it, or use another workdir") from None
    previous = _read_holder(fh)
    if previous:
      self.log(f"Taking over the lock of {self.path}: its holder ({_describe(previous)}) "
               "is gone")
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(dict(
        host=socket.gethostname(), pid=os.getpid(), command=self.command,
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))))
    fh.flush()
    os.fsync(fh.fileno())
    self._lock_fh = fh

  # -- files -----------------------------------------------------------------

  def join(self, *parts):
    return os.path.join(self.path, *parts)

  def read_json(self, name):
    """The JSON file `name` of the workdir, or None if there is none."""
    path = self.join(name)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as fh:
        return json.load(fh)
    except ValueError as e:
      raise errors.WorkdirError(f"{path}: not valid JSON ({e}); move it away") from None

  def write_json(self, name, value):
    write_atomic(self.join(name), json.dumps(value, indent=2, sort_keys=True))

  def write_text(self, name, text):
    write_atomic(self.join(name), text)

  def check_free_space(self, checkpoint_bytes, keep, free_bytes=None):
    """Refuses a run whose checkpoints cannot fit, before any work is done.

    keep + 1 checkpoints exist for a moment (the new one is written before the
    oldest is deleted).
    """
    needed = (keep + 1) * checkpoint_bytes + LOG_BYTES_MARGIN
    free = shutil.disk_usage(self.path).free if free_bytes is None else free_bytes
    if free < needed:
      mib = 2**20
      raise errors.WorkdirError(
          f"{self.flag}={self.path}: {free / mib:.0f} MiB free, the run needs about "
          f"{needed / mib:.0f} MiB ({keep + 1} checkpoints of "
          f"{checkpoint_bytes / mib:.0f} MiB and logs); free space, or lower "
          "--keep_checkpoints")

  def check_compatible(self, saved, current, ignore=()):
    """Refuses to resume a run whose saved settings differ from the current ones.

    `saved` and `current` map flag names to values (the saved ones from a previous
    run of this workdir); the first difference is named as its flag.
    """
    for key, value in current.items():
      if key in ignore or key not in (saved or {}):
        continue
      if _normalise(saved[key]) != _normalise(value):
        raise errors.ConfigError(
            f"--{key}={value}: the workdir {self.path!r} was trained with "
            f"{key}={saved[key]}; use a new {self.flag} or the same value")

  def has_checkpoints(self, directory="checkpoints"):
    return bool(checkpoint_prefixes(self.join(directory)))

  def checkpoints(self, checkpoint, *, keep, directory="checkpoints", restore_from=None,
                  chief=True, mirrors=()):
    """The `Checkpoints` of this workdir (`restore_from`: another workdir-relative
    directory to restore from, as the non-chief workers of a multi-worker run do)."""
    return Checkpoints(checkpoint, self.join(directory), keep=keep,
                       restore_dir=self.join(restore_from or directory), chief=chief,
                       log=self.log, mirrors=mirrors)


def _read_holder(fh):
  fh.seek(0)
  text = fh.read().strip()
  if not text:
    return None
  try:
    return json.loads(text)
  except ValueError:
    return {"unreadable": text[:80]}


def _describe(holder):
  if not holder:
    return "holder unknown"
  if "unreadable" in holder:
    return f"lock file says {holder['unreadable']!r}"
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, "
          f"{holder.get('command') or 'a command'} started {holder.get('started')}")


def _normalise(value):
  return json.loads(json.dumps(value))


def checkpoint_prefixes(directory):
  """The prefixes of the checkpoints whose index file is in `directory`."""
  return [p[:-len(".index")] for p in glob.glob(os.path.join(directory, "*.index"))]


def checkpoint_number(path):
  match = re.search(r"-(\d+)$", path)
  return int(match.group(1)) if match else -1


class Checkpoints:
  """A tf.train.CheckpointManager whose restore survives damaged checkpoints.

  `restore_latest()` tries the checkpoints of `restore_dir` newest first; one that
  cannot be read (a truncated or corrupted file, a missing shard) is reported with a
  warning naming the file and moved to `<dir>/damaged/`, and the next older one is
  tried. If none is intact it stops with one line. `save(number)` reports a failed
  write as one line naming the kept checkpoint. `mirrors`: the
  `keras_state.KerasVariables` the checkpoint holds (a run on Keras' JAX backend).
  """

  def __init__(self, checkpoint, directory, *, keep, restore_dir=None, chief=True,
               log=print, mirrors=()):
    self.checkpoint = checkpoint
    # keras_state.KerasVariables in `checkpoint` (Keras variables of another backend):
    # filled before each save, copied out after a restore.
    self.mirrors = list(mirrors)
    self.directory = directory
    self.restore_dir = restore_dir or directory
    self.keep = keep
    self.chief = chief
    self.log = log
    self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)

  @property
  def latest(self):
    return self.manager.latest_checkpoint

  def candidates(self):
    """Checkpoint prefixes of restore_dir, newest first (the pointer file's list and
    every `*.index` present, so a lost pointer file loses nothing)."""
    found = set(checkpoint_prefixes(self.restore_dir))
    state = None
    try:
      state = tf.train.get_checkpoint_state(self.restore_dir)
    except (tf.errors.OpError, ValueError):
      pass  # a damaged pointer file: the index files are still there
    if state is not None:
      for path in state.all_model_checkpoint_paths:
        if os.path.exists(path + ".index"):
          found.add(path)
    return sorted(found, key=checkpoint_number, reverse=True)

  def restore_latest(self, partial=False):
    """Restores the newest intact checkpoint; returns its path, or None if none.
    `partial`: the checkpoint object tracks only part of what was saved (export)."""
    damaged = []
    for path in self.candidates():
      reason = self._try_restore(path, partial)
      if reason is None:
        if damaged:
          self._set_aside(damaged, restored=path)
        return path
      damaged.append(path)
      self.log(f"warning: checkpoint {path} cannot be read ({reason}); trying the "
               "previous one")
    if damaged:
      raise errors.WorkdirError(
          f"no intact checkpoint in {self.restore_dir} ({len(damaged)} damaged, newest "
          f"{damaged[0]}): move the checkpoints away to start over")
    return None

  def restore_from(self, path, partial=False):
    """Restores the checkpoint `path`, or stops with one line naming it."""
    reason = self._try_restore(path, partial)
    if reason is not None:
      raise errors.WorkdirError(f"checkpoint {path} cannot be read ({reason})")
    return path

  def _try_restore(self, path, partial):
    """None when `path` restored, else the reason it could not be read."""
    try:
      status = self.checkpoint.restore(path)
      if partial:
        status.expect_partial()
      status.assert_existing_objects_matched()
      for mirror in self.mirrors:
        mirror.push()
      return None
    except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError,
            OSError) as e:
      # A truncated data file raises IndexError ("Read less bytes than requested"),
      # a corrupted one DataLossError (checksum), a cut index file an OpError
      # ("file is too short to be an sstable").
      reason = _first_line(e)
    # The failed restore's status object is in a reference cycle; collected at exit
    # it prints "Exception ignored in ... __del__". Collect it now.
    gc.collect()
    return reason

  def _set_aside(self, damaged, restored):
    """Moves damaged checkpoints to <dir>/damaged/ and points the manager at the
    restored one, so that the step they held is trained and saved again."""
    if not self.chief or self.restore_dir != self.directory:
      return
    target = os.path.join(self.directory, DAMAGED_DIR)
    os.makedirs(target, exist_ok=True)
    for prefix in damaged:
      for path in glob.glob(prefix + ".*"):
        os.replace(path, os.path.join(target, os.path.basename(path)))
      self.log(f"warning: moved the damaged checkpoint {os.path.basename(prefix)} to "
               f"{target}")
    kept = sorted((p for p in self.candidates()
                   if checkpoint_number(p) <= checkpoint_number(restored)),
                  key=checkpoint_number)
    # The pointer file (a text proto, as CheckpointManager writes it), now without
    # the damaged ones; timestamps keep the kept ones managed (deleted in turn).
    lines = [f'model_checkpoint_path: "{os.path.basename(restored)}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in kept]
    lines += [f"all_model_checkpoint_timestamps: {os.path.getmtime(p + '.index')}"
              for p in kept]
    lines.append("last_preserved_timestamp: 0.0")
    write_atomic(os.path.join(self.directory, "checkpoint"), "\n".join(lines) + "\n")
    self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                              max_to_keep=self.keep)

  def saved_at(self, number):
    latest = self.manager.latest_checkpoint
    return bool(latest) and checkpoint_number(latest) == number

  def save(self, number):
    """manager.save, with a failed write reported as one line naming the kept
    checkpoint.

    TensorFlow writes a checkpoint's files first and switches the `checkpoint`
    pointer file (atomically) only after they are complete, and deletes old
    checkpoints only after that: a write that fails half-way leaves the pointer at
    the last good one.
    """
    for mirror in self.mirrors:
      mirror.pull()
    try:
      return self.manager.save(checkpoint_number=number)
    except (OSError, tf.errors.OpError) as e:
      reason = _first_line(e)[:200]
      kept = tf.train.latest_checkpoint(self.directory)
      free = shutil.disk_usage(self.directory).free / 2**20
      raise errors.TrainingStopped(
          f"the checkpoint of step {number} could not be written to {self.directory} "
          f"({reason}; {free:.0f} MiB free there); the last good checkpoint "
          f"({kept or 'none yet'}) is kept: free space and rerun the same command to "
          "resume") from None


def _first_line(e):
  if isinstance(e, OSError):
    text = e.strerror or str(e)
  elif isinstance(e, tf.errors.OpError):
    text = e.message
  else:
    text = str(e)
  # Drop TensorFlow's "{{function_node ...}}" prefix: the rest names the file.
  text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return (lines[0] if lines else type(e).__name__)[:240]


def checkpoint_bytes(variables):
  """Bytes one checkpoint of these variables takes (values only; the index is small)."""
  return int(sum(np.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables))
