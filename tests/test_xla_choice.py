"""XLA for the training step is decided by measurement, remembered per machine and kept
by a resumed run; --jit_compile / --nojit_compile force it."""

import dataclasses
import json
import os
from unittest import mock

import pytest

from corinfomax_tf import config
from corinfomax_tf import flags as flags_lib
from corinfomax_tf.training import xla_choice


class FakeWorkdir:
  def __init__(self, checkpoints=False):
    self.files, self.checkpoints = {}, checkpoints

  def read_json(self, name):
    return self.files.get(name)

  def write_json(self, name, value):
    self.files[name] = json.loads(json.dumps(value))

  def has_checkpoints(self):
    return self.checkpoints


def tiny_config(jit_compile=None):
  cfg = config.Config(
      data=config.DataConfig(image_size=8),
      augment=config.AugmentConfig(),
      model=config.ModelConfig(depth=18, stem="cifar", width=2, projector="16-8"),
      loss=config.LossConfig(),
      optim=config.OptimConfig(),
      train=config.TrainConfig(workdir="w", jit_compile=jit_compile))
  return cfg


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("CORINFOMAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache" / xla_choice.CHOICE_FILE


def test_a_long_run_measures_once_per_machine_and_takes_the_faster_step(cache):
  calls = []

  def measure(cfg, batch):
    calls.append(batch)
    return {"no_xla": 2.0, "xla": 1.5}
  first = FakeWorkdir()
  choice = xla_choice.choose(tiny_config(), first, total_steps=1000, per_replica_batch=64,
                             measure_fn=measure)
  assert choice["jit_compile"] is True and choice["how"] == "measured" and calls == [64]
  assert first.files[xla_choice.CHOICE_FILE]["jit_compile"] is True
  assert "1500 ms/step with XLA, 2000 ms without, measured now" in xla_choice.describe(choice)
  # Another run of the same step on this machine: remembered, not measured again.
  again = xla_choice.choose(tiny_config(), FakeWorkdir(), total_steps=1000,
                            per_replica_batch=64, measure_fn=measure)
  assert again["how"] == "remembered" and again["jit_compile"] is True and calls == [64]
  # Another batch is another step: measured.
  xla_choice.choose(tiny_config(), FakeWorkdir(), total_steps=1000, per_replica_batch=32,
                    measure_fn=lambda cfg, b: calls.append(b) or {"no_xla": 1.0, "xla": 2.0})
  assert calls == [64, 32]
  assert len(json.loads(cache.read_text())) == 2


def test_a_near_tie_keeps_the_uncompiled_step():
  assert not xla_choice.decide({"no_xla": 1.0, "xla": 0.99})
  assert xla_choice.decide({"no_xla": 1.0, "xla": 1.0 / xla_choice.MARGIN})
  assert not xla_choice.decide({"no_xla": 1.0, "xla": 1.6})


def test_given_short_unmeasurable_and_resumed_runs_are_not_measured(cache):
  def measure(cfg, batch):
    raise AssertionError("measured")
  forced = xla_choice.choose(tiny_config(jit_compile=True), FakeWorkdir(), total_steps=10**6,
                             per_replica_batch=8, measure_fn=measure)
  assert forced["jit_compile"] is True and forced["how"] == "given"
  assert xla_choice.describe(forced) == "XLA for the training step: on (--jit_compile)"
  off = xla_choice.choose(tiny_config(jit_compile=False), FakeWorkdir(), total_steps=10**6,
                          per_replica_batch=8, measure_fn=measure)
  assert off["jit_compile"] is False
  assert xla_choice.describe(off) == "XLA for the training step: off (--nojit_compile)"
  short = xla_choice.choose(tiny_config(), FakeWorkdir(), total_steps=499,
                            per_replica_batch=8, measure_fn=measure)
  assert short["jit_compile"] is False and "499 steps" in xla_choice.describe(short)
  other = xla_choice.choose(tiny_config(), FakeWorkdir(), total_steps=10**6,
                            per_replica_batch=8, measurable=False, why_not="several workers",
                            measure_fn=measure)
  assert other["jit_compile"] is False and "several workers" in xla_choice.describe(other)
  # A resumed workdir keeps its first choice, whatever this machine would say now.
  resumed = FakeWorkdir(checkpoints=True)
  resumed.files[xla_choice.CHOICE_FILE] = {"jit_compile": True, "how": "measured",
                                           "seconds": {"no_xla": 2.0, "xla": 1.0}}
  kept = xla_choice.choose(tiny_config(), resumed, total_steps=10**6, per_replica_batch=8,
                           measure_fn=measure)
  assert kept["jit_compile"] is True and kept["how"] == "earlier run"
  assert not cache.exists()


def test_the_flag_is_three_way_and_the_resolved_flagfile_leaves_it_out_when_not_given():
  from absl import flags
  values = flags.FlagValues()
  flags_lib._TARGET[0] = values
  try:
    flags_lib.define_flags()
  finally:
    flags_lib._TARGET[0] = flags.FLAGS
  values(["prog"])
  assert values.jit_compile is None
  assert "jit_compile" not in flags_lib.flagfile_text({"jit_compile": None, "lr": 0.5})
  values(["prog", "--nojit_compile"])
  assert values.jit_compile is False
  values(["prog", "--jit_compile"])
  assert values.jit_compile is True


@pytest.mark.slow
def test_the_measurement_times_both_real_steps(cache):
  seconds = xla_choice.measure(tiny_config(), 4)
  assert set(seconds) == {"no_xla", "xla"} and all(v > 0 for v in seconds.values())


def test_the_key_changes_with_the_step_and_not_with_the_workdir():
  cfg = tiny_config()
  key = xla_choice.machine_key(cfg, 8)
  assert key == xla_choice.machine_key(
      dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workdir="other")), 8)
  assert key != xla_choice.machine_key(cfg, 16)
  assert key != xla_choice.machine_key(
      dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=4)), 8)
  # A measurement under other thread or oneDNN settings holds for those only.
  with mock.patch.dict(os.environ, {"ONEDNN_MAX_CPU_ISA": "AVX2"}):
    assert key != xla_choice.machine_key(cfg, 8)
