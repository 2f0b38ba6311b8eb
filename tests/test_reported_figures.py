"""Every figure a run reports describes the whole run it claims to: a run preempted
mid-epoch and resumed reports the uninterrupted run's final terms and says how many
steps its epochs ran; an extension that does not redo the probe or the export says so
instead of keeping an earlier step's figures at the top of summary.json."""

import os
import signal
import types

import keras
import pytest

from corinfomax_tf import config as config_lib
from corinfomax_tf import errors
from corinfomax_tf import flags as flags_lib
from corinfomax_tf.training import pretraining

pytestmark = pytest.mark.slow

SMOKE = dict(dataset="digits", image_size=8, normalization="digits", depth=18,
             stem="cifar", width=4, projector="32-16", alpha=50.0, epochs=2,
             batch_size=16, steps_per_epoch=4, lr=0.05, warmup_epochs=1,
             crop_min_scale=0.3, probe_epochs=0, probe_random=False, preview_images=0,
             deterministic=True, verbose="2", monitor_every_steps=0)


def cfg_of(workdir, **changes):
  values = flags_lib.defaults()
  values.update(SMOKE, workdir=str(workdir), **changes)
  return config_lib.from_flags(types.SimpleNamespace(**values))


class SignalAt(keras.callbacks.Callback):
  """Sends this process SIGTERM after step `step` (the job's preemption handler
  saves at the next step and stops)."""

  def __init__(self, step):
    super().__init__()
    self.step = step

  def on_train_batch_end(self, batch, logs=None):
    if int(self.model.step_counter.numpy()) == self.step:
      os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_preempted_mid_epoch_reports_the_uninterrupted_final_terms(tmp_path, capsys):
  reference = pretraining.PretrainingJob(cfg_of(tmp_path / "ref"), log=print).run()
  workdir = tmp_path / "run"
  with pytest.raises(errors.Preempted, match="checkpoint saved at step 6"):
    pretraining.PretrainingJob(cfg_of(workdir), log=print,
                               callbacks=[SignalAt(5)]).run()
  capsys.readouterr()
  resumed = pretraining.PretrainingJob(cfg_of(workdir), log=print).run()
  out = capsys.readouterr().out
  assert resumed["step"] == reference["step"] == 8
  # The whole last epoch's means, bitwise those of the uninterrupted run (before:
  # the means of the two steps after the restart).
  assert resumed["final_terms"] == reference["final_terms"]
  assert "Epoch 2/2: 2 steps (resumed after step 2 of 4)" in out, out


def test_an_extension_that_does_not_probe_again_says_its_probe_is_of_an_earlier_step(
    tmp_path, capsys):
  workdir = tmp_path / "run"
  first = pretraining.PretrainingJob(cfg_of(workdir, epochs=1, probe_epochs=1),
                                     log=print).run()
  assert first["probe"] and first["probe_step"] == 4
  capsys.readouterr()
  longer = pretraining.PretrainingJob(
      cfg_of(workdir, epochs=1, extend_epochs=("1",)), log=print).run()
  out = capsys.readouterr().out
  assert longer["step"] == 8 and "probe" not in longer and "probe_dataset" not in longer
  assert longer["earlier"]["probe"] == first["probe"]
  assert longer["earlier"]["probe_step"] == 4
  assert "Not redone at step 8: probe (step 4)" in out
  # Probing again puts a probe of the final step back at the top.
  again = pretraining.PretrainingJob(
      cfg_of(workdir, epochs=1, extend_epochs=("1",), probe_epochs=1), log=print).run()
  assert again["probe_step"] == 8 and "probe" in again
