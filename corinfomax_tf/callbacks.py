"""Training callbacks: checkpoints, the non-finite guard, scalars and throughput."""

import math
import time

import keras
import numpy as np
import tensorflow as tf


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; training stopped before any save."""


def _scalar(value):
  return float(np.asarray(value).reshape(-1)[0])


class FiniteLossGuard(keras.callbacks.Callback):
  """Stops training with a clear error as soon as the loss is not finite.

  Runs on every batch, before the checkpoint callback's next save, so the last
  checkpoint written is the last good one.
  """

  def __init__(self, workdir):
    super().__init__()
    self.workdir = workdir

  def on_train_batch_end(self, batch, logs=None):
    loss = _scalar(logs["loss"])
    if not math.isfinite(loss):
      step = int(self.model.step_counter.numpy())
      raise NonFiniteLossError(
          f"loss is {loss} after step {step}: training stopped; the last good checkpoint "
          f"in {self.workdir} is kept (lower --lr, raise --eps, or check the data)")


class CheckpointSaver(keras.callbacks.Callback):
  """Saves a checkpoint at the end of every epoch, numbered by the global step."""

  def __init__(self, manager):
    super().__init__()
    self.manager = manager

  def on_epoch_end(self, epoch, logs=None):
    if logs and not all(math.isfinite(_scalar(v)) for v in logs.values()):
      raise NonFiniteLossError(f"non-finite metrics at the end of epoch {epoch + 1}: "
                               f"{logs}; no checkpoint written")
    self.manager.save(checkpoint_number=int(self.model.step_counter.numpy()))


def scalar_tag(name):
  """TensorBoard tag of a training log key."""
  if name == "loss":
    return "loss/total"
  if name.startswith("probe_"):
    return "online_probe/" + name[len("probe_"):]
  return f"loss/{name}"


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

  def on_train_batch_end(self, batch, logs=None):
    step = int(self.model.step_counter.numpy())
    if step % self.every:
      return
    now = time.perf_counter()
    with self.writer.as_default(step=step):
      for name, value in logs.items():
        tf.summary.scalar(scalar_tag(name), _scalar(value))
      tf.summary.scalar("optim/learning_rate",
                        float(self.lr_fn(self.model.optimizer.iterations - 1)))
      if self._last_time is not None and step > self._last_step:
        rate = (step - self._last_step) * self.batch / (now - self._last_time)
        tf.summary.scalar("perf/images_per_second", rate)
    self._last_time, self._last_step = now, step

  def on_epoch_begin(self, epoch, logs=None):
    # Do not count the time between epochs (checkpoint writes) as training time.
    self._last_time = None

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
    from corinfomax_tf import evaluation
    encoder = self.model.encoder
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
