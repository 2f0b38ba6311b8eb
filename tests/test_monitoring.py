"""Monitoring: effective rank and LDMI against NumPy, collapse warnings, and a real
TensorBoard server reading a short run's logs."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf import config
from corinfomax_tf.evaluation import monitoring
from corinfomax_tf.training import schedules
from corinfomax_tf.method import model as ssl_model
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.cfg")


def test_effective_rank_on_known_spectra():
  assert monitoring.effective_rank(monitoring.eigenvalues(np.eye(32))) == pytest.approx(32)
  rs = np.random.RandomState(0)
  for k in (1, 4, 10):
    basis = np.linalg.qr(rs.randn(32, k))[0]
    R = basis @ basis.T                      # rank k, equal eigenvalues
    assert monitoring.effective_rank(monitoring.eigenvalues(R)) == pytest.approx(k, rel=1e-6)
  lam = np.array([4.0, 2.0, 1.0, 1.0])
  p = lam / lam.sum()
  assert monitoring.effective_rank(lam) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
  assert monitoring.effective_rank(np.zeros(4)) == 0.0


def _covariances(z1, z2):
  z1c, z2c = z1 - z1.mean(0), z2 - z2.mean(0)
  n = len(z1)
  return z1c.T @ z1c / n, z2c.T @ z2c / n, z1c.T @ z2c / n


def test_ldmi_on_known_covariances():
  rs = np.random.RandomState(0)
  z1, z2 = rs.randn(20000, 6), rs.randn(20000, 6)
  assert abs(monitoring.ldmi(*_covariances(z1, z2), 1e-8)) < 0.01      # independent
  same = monitoring.ldmi(*_covariances(z1, z1), 1e-8)
  assert same > 30                                                      # identical
  noisy = monitoring.ldmi(*_covariances(z1, z1 + 0.5 * rs.randn(20000, 6)), 1e-8)
  assert 0.5 < noisy < same
  # Jointly Gaussian, one dimension: I = -1/2 log(1 - rho^2).
  rho = 0.8
  x = rs.randn(200000, 1)
  y = rho * x + np.sqrt(1 - rho**2) * rs.randn(200000, 1)
  assert monitoring.ldmi(*_covariances(x, y), 1e-8) == pytest.approx(
      -0.5 * np.log(1 - rho**2), rel=0.02)
  # Equals the joint-covariance form (Schur complement), with eps on the diagonal.
  R1, R2, R12 = _covariances(z1[:50, :3], (z1[:50, :3] + rs.randn(50, 3)))
  eps = 1e-3
  joint = np.block([[R1, R12], [R12.T, R2]]) + eps * np.eye(6)
  expected = 0.5 * (np.linalg.slogdet(R1 + eps * np.eye(3))[1] +
                    np.linalg.slogdet(R2 + eps * np.eye(3))[1] - np.linalg.slogdet(joint)[1])
  assert monitoring.ldmi(R1, R2, R12, eps) == pytest.approx(expected, rel=1e-9)


def test_health_assessment():
  healthy = {"R1": np.linspace(1, 0.5, 16) * 1e-2}
  assert monitoring.assess_health(healthy, 1e-3, 16, 0.1) == []
  dimensional = {"R1": np.array([1.0] + [1e-9] * 15)}
  [message] = monitoring.assess_health(dimensional, 1e-3, 16, 0.1)
  assert message.startswith("dimensional collapse")
  total = {"R1": np.full(16, 1e-12)}
  [message] = monitoring.assess_health(total, 0.0, 16, 0.1)
  assert message.startswith("total collapse")


def _fit_with_monitor(tmp_path, collapse):
  keras.utils.set_random_seed(0)
  model = ssl_model.build_pretraining_model(
      config.ModelConfig(width=4, projector="16-8"), config.LossConfig(alpha=10.0))
  if collapse:
    # A projector whose output is constant: its last layer frozen at zero.
    last = model.projector.get_layer("dense2")
    last.kernel.assign(tf.zeros_like(last.kernel))
    last.trainable = False
  opt = schedules.ReferenceSGD(0.05)
  model.compile(optimizer=opt)
  opt.build(model.pretraining_variables)
  rs = np.random.RandomState(0)
  ds = tf.data.Dataset.from_tensor_slices(
      (rs.rand(64, 2, 8, 8, 3).astype(np.float32), np.zeros(64, np.int64))).batch(16)
  monitor = monitoring.TrainingMonitor(str(tmp_path), every_steps=2, log=lambda m: None)
  model.fit(ds, epochs=2, verbose=0, callbacks=[monitor], shuffle=False)
  return monitor


@pytest.mark.slow
def test_collapse_warning_fires_on_forced_collapse_only(tmp_path):
  collapsed = _fit_with_monitor(tmp_path / "collapsed", collapse=True)
  assert collapsed.warnings and "total collapse" in collapsed.warnings[-1][1]
  healthy = _fit_with_monitor(tmp_path / "healthy", collapse=False)
  assert healthy.warnings == []
  assert healthy.last["ldmi"] > 0 and healthy.last["R1/effective_rank"] > 1


def _get(port, path):
  with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
    return json.loads(r.read().decode())


@pytest.mark.slow
def test_a_real_tensorboard_server_lists_the_run(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  result = helpers.run(
      [sys.executable, "-m", "corinfomax_tf.train", f"--flagfile={SMOKE}",
       f"--workdir={workdir}", "--monitor_every_steps=1", "--online_probe",
       "--knn_every_epochs=1", "--knn_k=5", "--preview_images=4"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # Off a terminal: one line per epoch, no carriage-return bar.
  assert "\r" not in result.stdout and "Epoch 2/2: 3 steps in" in result.stdout
  port = helpers.free_port()
  server = helpers.popen(
      [sys.executable, "-m", "tensorboard.main", f"--logdir={workdir}", f"--port={port}",
       "--host=127.0.0.1", "--load_fast=false"],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
  try:
    deadline = time.time() + 120
    scalars = None
    while time.time() < deadline:
      try:
        scalars = _get(port, "/data/plugin/scalars/tags")
        if "train" in scalars and "eval" in scalars and scalars["train"]:
          break
      except OSError:
        pass
      time.sleep(1)
    assert scalars and "train" in scalars, "TensorBoard did not serve the run"
    train_tags = set(scalars["train"])
    for tag in ("loss/total", "loss/attraction", "loss/cov", "loss/logdet1", "loss/logdet2",
                "optim/learning_rate", "optim/grad_norm", "optim/weight_norm",
                "perf/images_per_second", "perf/step_time_ms",
                "spectrum/R1_effective_rank", "spectrum/R1_effective_rank_share",
                "spectrum/R2_effective_rank", "spectrum/ldmi", "online_probe/top1"):
      assert tag in train_tags, (tag, sorted(train_tags))
    assert {"knn/k5_top1", "probe/top1"} <= set(scalars["eval"])
    histograms = _get(port, "/data/plugin/histograms/tags")
    assert "spectrum/R1_log10_eigenvalues" in histograms["train"]
    images = _get(port, "/data/plugin/images/tags")
    assert {"spectrum/sorted_eigenvalues", "augmentations/original_view1_view2"} <= set(
        images["train"])
    text = _get(port, "/data/plugin/text/tags")
    assert "config/flags" in text["train"]
    # The logged values are the run's: each step's own loss, whose mean over the
    # last epoch (steps 4-6) is the epoch mean in summary.json.
    series = _get(port, "/data/plugin/scalars/scalars?run=train&tag=loss/total")
    assert [point[1] for point in series] == [1, 2, 3, 4, 5, 6]
    with open(os.path.join(workdir, "summary.json")) as fh:
      final = json.load(fh)["final_terms"]["loss"]
    assert np.mean([point[2] for point in series[3:]]) == pytest.approx(final, rel=1e-5)
  finally:
    server.terminate()
    server.wait(timeout=30)
