"""Training callbacks: checkpoints, the non-finite guard, scalars and throughput."""

import collections
import contextlib
import math
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from corinfomax_tf import errors
from corinfomax_tf.evaluation import probes as evaluation


class StepValues:
  """Each step's own values from Keras' logs, which are means since the epoch began:
  value_b = (b+1)*mean_b - b*mean_(b-1). Call reset() at every epoch start."""

  def __init__(self):
    self._prev = {}

  def reset(self):
    self._prev = {}

  def __call__(self, batch, logs):
    means = {k: _scalar(v) for k, v in logs.items()}
    values = {k: (batch + 1) * m - batch * self._prev.get(k, m) for k, m in means.items()}
    self._prev = means
    return values


def _scalar(value):
  return float(np.asarray(value).reshape(-1)[0])


class FiniteLossGuard(keras.callbacks.Callback):
  """Stops training with a clear error as soon as the loss or the gradient is not
  finite.

  Runs on every batch, before the checkpoint callback's next save (and before a
  preemption save), so the last checkpoint written is the last good one. A
  non-finite gradient with a finite loss has already been applied to the weights in
  memory: they are never saved. (Under float16 loss scaling an overflowing step is
  skipped by the optimizer and logs a gradient norm of 0: not an error.)
  """

  def __init__(self, workdir):
    super().__init__()
    self.workdir = workdir

  def on_train_batch_end(self, batch, logs=None):
    for key, what in (("loss", "loss"), ("grad_norm", "gradient norm")):
      if key not in logs:
        continue
      value = _scalar(logs[key])
      if not math.isfinite(value):
        step = int(self.model.step_counter.numpy())
        raise errors.TrainingStopped(
            f"{what} is {value} after step {step}: training stopped; the last good "
            f"checkpoint in {self.workdir} is kept (lower --lr, raise --eps, or check "
            "the data)")


class LossSpikeGuard(keras.callbacks.Callback):
  """Optional: stops training when one step's loss exceeds `factor` times the median
  of the previous `window` steps' losses (a divergence that has not reached NaN yet).

  With the projector's outputs l2-normalised (and R starting at I) the eigenvalues
  of R stay at most about 1, so the loss stays positive and a ratio to the median
  is meaningful. Runs on every batch before any
  save, like the non-finite guard; the median needs a full window first, so the
  first `window` steps of a run (or of a resumed run) are never judged.
  """

  def __init__(self, factor, window, workdir):
    super().__init__()
    self.factor, self.window, self.workdir = factor, window, workdir
    self.recent = collections.deque(maxlen=window)
    self.step_values = StepValues()

  def on_epoch_begin(self, epoch, logs=None):
    self.step_values.reset()

  def on_train_batch_end(self, batch, logs=None):
    loss = self.step_values(batch, {"loss": logs["loss"]})["loss"]
    if len(self.recent) == self.window:
      median = float(np.median(self.recent))
      if median > 0 and loss > self.factor * median:
        step = int(self.model.step_counter.numpy())
        raise errors.TrainingStopped(
            f"loss {loss:.4g} at step {step} is over --loss_spike_factor={self.factor:g} "
            f"times the median {median:.4g} of the previous {self.window} steps: training "
            f"stopped; the last good checkpoint in {self.workdir} is kept (lower --lr, "
            "or raise --loss_spike_factor)")
    self.recent.append(loss)


class CheckpointSaver(keras.callbacks.Callback):
  """Saves a checkpoint at the end of every epoch, numbered by the global step
  (`checkpoints`: a workdir's `Checkpoints`)."""

  def __init__(self, checkpoints):
    super().__init__()
    self.checkpoints = checkpoints

  def on_epoch_end(self, epoch, logs=None):
    terms = {k: v for k, v in (logs or {}).items() if k in ("loss", "attraction", "cov")}
    if not all(math.isfinite(_scalar(v)) for v in terms.values()):
      raise errors.TrainingStopped(f"non-finite metrics at the end of epoch {epoch + 1}: "
                               f"{logs}; no checkpoint written")
    step = int(self.model.step_counter.numpy())
    if self.checkpoints.saved_at(step):
      return  # already saved at this step (a preemption save just before)
    self.checkpoints.save(step)


def scalar_tag(name):
  """TensorBoard tag of a training log key."""
  if name == "loss":
    return "loss/total"
  if name.startswith("probe_"):
    return "online_probe/" + name[len("probe_"):]
  if name == "grad_norm":
    return "optim/grad_norm"
  return f"loss/{name}"


class PreemptionSaver(keras.callbacks.Callback):
  """On SIGTERM (a scheduler's preemption) or SIGINT, finishes the current step,
  saves a checkpoint at that step and stops training.

  The signal handler only sets a flag: the save happens between steps, on the
  training thread, so a checkpoint is never taken of a half-applied update.
  """

  def __init__(self, checkpoints, on_save=None):
    super().__init__()
    self.checkpoints = checkpoints
    self.on_save = on_save     # called with the step after the save (epoch terms)
    self.signal_name = None
    self.saved_step = None

  @property
  def stopped(self):
    return self.saved_step is not None

  @contextlib.contextmanager
  def installed(self):
    def handler(signum, frame):
      self.signal_name = signal.Signals(signum).name
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for sig, old in previous.items():
        signal.signal(sig, old)

  def on_train_batch_end(self, batch, logs=None):
    if self.signal_name is None or self.stopped:
      return
    self.saved_step = int(self.model.step_counter.numpy())
    if not math.isfinite(_scalar(logs["loss"])):
      raise errors.TrainingStopped(f"loss is not finite at step {self.saved_step}; "
                               "not saved on preemption")
    self.checkpoints.save(self.saved_step)
    if self.on_save is not None:
      self.on_save(self.saved_step)
    self.model.stop_training = True


def tracker_state(model):
  """{metric name: [total, count]} of the model's epoch means (Keras Mean trackers),
  summed over replicas."""
  return {m.name: [float(np.asarray(v.numpy()).reshape(-1)[0]) for v in m.variables]
          for m in model.metrics}


def _assign_summed(variable, value):
  """Assigns a replica-summed (on-read) metric variable: the value on the first
  replica, 0 on the others, so that its sum is `value`."""
  tf_variable = getattr(variable, "value", variable)
  components = getattr(tf_variable, "values", None)
  if components is not None and len(components) > 1:
    for i, component in enumerate(components):
      component.assign(tf.cast(value if i == 0 else 0.0, component.dtype))
  else:
    variable.assign(value)


class RestoreEpochTerms(keras.callbacks.Callback):
  """Puts the epoch means saved with a mid-epoch checkpoint back after Keras resets
  them at the start of the resumed epoch: the epoch's reported terms are then those
  of the whole epoch, as an uninterrupted run reports them."""

  def __init__(self, state):
    super().__init__()
    self.state = state

  def on_epoch_begin(self, epoch, logs=None):
    if self.state is None:
      return
    for metric in self.model.metrics:
      for variable, value in zip(metric.variables, self.state.get(metric.name, ())):
        _assign_summed(variable, value)
    self.state = None


class ScalarLogger(keras.callbacks.Callback):
  """Writes the loss terms, learning rate and images/s to TensorBoard every N steps."""

  def __init__(self, logdir, every_steps, global_batch_size, learning_rate_fn):
    super().__init__()
    self.writer = tf.summary.create_file_writer(logdir)
    self.every = every_steps
    self.batch = global_batch_size
    self.lr_fn = learning_rate_fn
    self._last_time = None
    self._last_step = None
    self.step_values = StepValues()

  def on_train_batch_end(self, batch, logs=None):
    # Keras' logs are means since the start of the epoch; TensorBoard gets each
    # step's own value.
    values = self.step_values(batch, logs)
    step = int(self.model.step_counter.numpy())
    if step % self.every:
      return
    now = time.perf_counter()
    with self.writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(scalar_tag(name), value)
      tf.summary.scalar("optim/learning_rate",
                        float(self.lr_fn(self.model.optimizer.iterations - 1)))
      if self._last_time is not None and step > self._last_step:
        seconds = (now - self._last_time) / (step - self._last_step)
        tf.summary.scalar("perf/images_per_second", self.batch / seconds)
        tf.summary.scalar("perf/step_time_ms", 1000.0 * seconds)
    self._last_time, self._last_step = now, step

  def on_epoch_begin(self, epoch, logs=None):
    # Do not count the time between epochs (checkpoint writes) as training time.
    self._last_time = None
    self.step_values.reset()

  def on_train_end(self, logs=None):
    self.writer.flush()


class Throughput(keras.callbacks.Callback):
  """Images per second over the epochs after the first (which includes tracing)."""

  def __init__(self, global_batch_size):
    super().__init__()
    self.batch = global_batch_size
    self.samples = []   # (seconds, steps) per epoch
    self._start = None
    self._steps = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()
    self._steps = 0

  def on_train_batch_end(self, batch, logs=None):
    self._steps += 1

  def on_epoch_end(self, epoch, logs=None):
    self.samples.append((time.perf_counter() - self._start, self._steps))

  def images_per_second(self):
    timed = self.samples[1:] or self.samples
    seconds = sum(s for s, _ in timed)
    steps = sum(n for _, n in timed)
    return steps * self.batch / seconds if seconds > 0 else float("nan")


class KNNMonitor(keras.callbacks.Callback):
  """kNN top-1 of the frozen encoder on the test split every N epochs (and at the
  end), written to TensorBoard under eval/ and printed."""

  def __init__(self, train_ds, test_ds, num_classes, every_epochs, ks, temperature,
               logdir):
    super().__init__()
    self.train_ds = train_ds
    self.test_ds = test_ds
    self.num_classes = num_classes
    self.every = every_epochs
    self.ks = ks
    self.temperature = temperature
    self.writer = tf.summary.create_file_writer(logdir)
    self.last = {}

  def on_epoch_end(self, epoch, logs=None):
    if (epoch + 1) % self.every:
      return
    encoder = self.model.features
    train_x, train_y = evaluation.extract_features(encoder, self.train_ds)
    test_x, test_y = evaluation.extract_features(encoder, self.test_ds)
    self.last = evaluation.knn_evaluate(train_x, train_y, test_x, test_y, self.num_classes,
                                        ks=self.ks, temperature=self.temperature)
    step = int(self.model.step_counter.numpy())
    with self.writer.as_default(step=step):
      for name, value in self.last.items():
        tf.summary.scalar(f"knn/{name}", value)
    self.writer.flush()
    print("kNN (epoch %d): %s" % (epoch + 1, ", ".join(
        f"{k} {v:.2f}%" for k, v in self.last.items())), flush=True)


class ProgressBar(keras.callbacks.Callback):
  """One line per epoch with images/s and the loss terms; on a terminal also a live
  bar with ETA (redrawn in place at most 5 times a second). Off a terminal (CI
  logs, files) only the per-epoch lines are written."""

  KEYS = ("loss", "attraction", "cov", "probe_top1")

  def __init__(self, epochs, steps_per_epoch, global_batch_size, interactive,
               stream=None):
    super().__init__()
    self.epochs = epochs
    self.steps = steps_per_epoch
    self.batch = global_batch_size
    self.interactive = interactive
    self.stream = stream or sys.stdout
    self._start = self._last_draw = 0.0
    self._epoch = 0

  def _terms(self, logs):
    return "  ".join(f"{k} {_scalar(logs[k]):.4g}" for k in self.KEYS if k in (logs or {}))

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch + 1
    self._start = time.perf_counter()
    self._last_draw = 0.0
    self._ran = 0
    # A resumed epoch runs only the steps after its checkpoint.
    self._before = self.steps - ((self.params or {}).get("steps") or self.steps)

  def on_train_batch_end(self, batch, logs=None):
    self._ran = batch + 1
    if not self.interactive:
      return
    now = time.perf_counter()
    done = self._before + batch + 1
    if now - self._last_draw < 0.2 and done < self.steps:
      return
    self._last_draw = now
    elapsed = now - self._start
    rate = (batch + 1) * self.batch / elapsed if elapsed > 0 else 0.0
    eta = (self.steps - done) * elapsed / (batch + 1)
    width = 20
    filled = int(width * done / self.steps)
    bar = "=" * filled + ">" * (filled < width) + "." * (width - filled - 1)
    self.stream.write(f"\rEpoch {self._epoch}/{self.epochs} [{bar[:width]}] {done}/{self.steps}"
                      f"  ETA {eta:4.0f}s  {rate:.0f} img/s  {self._terms(logs)}\x1b[K")
    self.stream.flush()

  def on_epoch_end(self, epoch, logs=None):
    elapsed = time.perf_counter() - self._start
    rate = self._ran * self.batch / elapsed if elapsed > 0 else 0.0
    steps = f"{self._ran} steps"
    if self._before:
      steps += f" (resumed after step {self._before} of {self.steps})"
    line = (f"Epoch {epoch + 1}/{self.epochs}: {steps} in {elapsed:.1f}s, {rate:.0f} "
            f"img/s  {self._terms(logs)}")
    self.stream.write(f"\r{line}\x1b[K\n" if self.interactive else f"{line}\n")
    self.stream.flush()


class FlatStartWarning(keras.callbacks.Callback):
  """Warns once when the first `steps` steps of a run all have an attraction and a
  gradient norm of about 0: the two views are identical and nothing learns (constant
  or black images, e.g. pixels of a dtype read as zeros). The warning goes to the
  log and to `warnings` (the summary's health warnings)."""

  def __init__(self, steps=5, attraction_floor=1e-7, grad_floor=1e-4, log=None):
    super().__init__()
    self.steps = steps
    self.attraction_floor = attraction_floor
    self.grad_floor = grad_floor
    self.log = log or print
    self.seen = []
    self.warnings = []

  def on_train_batch_end(self, batch, logs=None):
    if len(self.seen) >= self.steps or not logs or "attraction" not in logs:
      return
    self.seen.append((abs(_scalar(logs["attraction"])), abs(_scalar(logs.get("grad_norm", 0.0)))))
    if len(self.seen) < self.steps:
      return
    attraction = max(a for a, _ in self.seen)
    grad = max(g for _, g in self.seen)
    if attraction < self.attraction_floor and grad < self.grad_floor:
      message = (f"steps 1-{self.steps}: attraction {attraction:.1e} and gradient norm "
                 f"{grad:.1e}, both about 0: the two views are identical and nothing "
                 "learns; the images may be constant (all black?): check their dtype and "
                 "range (uint8 0..255, or float in [0, 1])")
      self.warnings.append((int(self.model.step_counter.numpy()), message))
      self.log(f"warning: {message}")
