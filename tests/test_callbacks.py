"""The guards that stop a run before a bad checkpoint, fed Keras-style logs."""

import types

import numpy as np
import pytest

from corinfomax_tf.training import callbacks
from corinfomax_tf import errors


class FakeModel:
  """What the guards read from the model: the global step."""

  def __init__(self):
    self.step = 0
    self.step_counter = types.SimpleNamespace(numpy=lambda: np.int64(self.step))


def feed(guard, epochs):
  """Runs per-step losses through `guard` as fit would: logs hold the running mean of
  the epoch so far."""
  model = FakeModel()
  guard.set_model(model)
  for epoch, losses in enumerate(epochs):
    guard.on_epoch_begin(epoch)
    for batch, _ in enumerate(losses):
      model.step += 1
      guard.on_train_batch_end(batch, {"loss": np.float32(np.mean(losses[:batch + 1])),
                                       "grad_norm": np.float32(1.0)})


def test_a_spike_stops_the_run_naming_the_step_and_the_median():
  guard = callbacks.LossSpikeGuard(2.0, 5, "/runs/x")
  with pytest.raises(errors.TrainingStopped,
                     match=r"loss 25 at step 8 is over --loss_spike_factor=2 times the median "
                           r"10 of the previous 5 steps: .* /runs/x is kept"):
    # The window spans the epoch boundary; step 8 is the 3rd of the second epoch.
    feed(guard, [[10.0, 12.0, 9.0, 10.0, 11.0], [10.0, 9.5, 25.0]])


def _stops(factor, window, epochs):
  """The step at which a LossSpikeGuard stops the run, or None when it lets it run;
  the guard's window must have seen every step it let through."""
  guard = callbacks.LossSpikeGuard(factor, window, "w")
  try:
    feed(guard, epochs)
  except errors.TrainingStopped as e:
    return int(str(e).split(" at step ")[1].split()[0])
  assert len(guard.recent) == min(window, sum(len(e) for e in epochs))
  assert guard.recent[-1] == pytest.approx(epochs[-1][-1])
  return None


def test_no_stop_below_the_factor_or_before_the_window_is_full():
  # 19.9 is under 2 x the median 10; 20.1 over it, at the same step.
  assert _stops(2.0, 5, [[10.0, 10.0, 10.0, 10.0, 10.0, 19.9, 10.0]]) is None
  assert _stops(2.0, 5, [[10.0, 10.0, 10.0, 10.0, 10.0, 20.1, 10.0]]) == 6
  # A spike in the first `window` steps is not judged (no median yet); the same
  # spike after them is.
  assert _stops(2.0, 5, [[10.0, 50.0, 10.0], [10.0, 10.0, 10.0]]) is None
  assert _stops(2.0, 5, [[10.0, 10.0, 10.0], [10.0, 10.0, 50.0]]) == 6


def test_slow_growth_is_not_a_spike():
  growth = list(10.0 * 1.05 ** np.arange(40))
  assert _stops(1.5, 5, [growth]) is None
  assert _stops(1.5, 5, [growth + [growth[-1] * 1.6]]) == 41


@pytest.mark.parametrize("key, message", [("loss", "loss is nan after step 3"),
                                          ("grad_norm", "gradient norm is inf after step 3")])
def test_non_finite_loss_or_gradient_stops_the_run(key, message):
  guard = callbacks.FiniteLossGuard("w")
  model = FakeModel()
  guard.set_model(model)
  for batch in range(3):
    model.step += 1
    logs = {"loss": np.float32(10.0), "grad_norm": np.float32(1.0)}
    if batch == 2:
      logs[key] = np.float32("nan" if key == "loss" else "inf")
      with pytest.raises(errors.TrainingStopped, match=message):
        guard.on_train_batch_end(batch, logs)
    else:
      guard.on_train_batch_end(batch, logs)
