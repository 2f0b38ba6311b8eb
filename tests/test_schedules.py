"""Warm-up + cosine schedule and the PyTorch-semantics SGD."""

import math

import numpy as np
import tensorflow as tf

from corinfomax_tf.training import schedules


def test_warmup_cosine_values():
  s = schedules.WarmupCosine(base_lr=0.5, total_steps=100, warmup_steps=10,
                             warmup_start_lr=3e-3, min_lr=1e-6)
  assert math.isclose(float(s(0)), 3e-3, rel_tol=1e-6)
  assert math.isclose(float(s(5)), 3e-3 + (0.5 - 3e-3) * 0.5, rel_tol=1e-6)
  assert math.isclose(float(s(10)), 0.5, rel_tol=1e-6)
  assert math.isclose(float(s(55)), 1e-6 + 0.5 * (0.5 - 1e-6), rel_tol=1e-5)
  assert math.isclose(float(s(100)), 1e-6, rel_tol=1e-3)
  values = [float(s(i)) for i in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  clone = schedules.WarmupCosine(**s.get_config())
  assert float(clone(37)) == float(s(37))


def test_cosine_stepped_per_epoch_is_pytorchs_cosine_annealing_per_epoch():
  """Linear evaluation: CosineAnnealingLR(T_max=epochs, eta_min) stepped after each
  epoch gives eta_min + (base - eta_min) * (1 + cos(pi * e / epochs)) / 2 to every
  step of epoch e (0-based)."""
  epochs, steps_per_epoch, base, low = 5, 7, 0.2, 2e-3
  s = schedules.WarmupCosine(base_lr=base, total_steps=epochs, warmup_steps=0,
                             min_lr=low, steps_per_update=steps_per_epoch)
  for step in range(epochs * steps_per_epoch):
    e = step // steps_per_epoch
    want = low + (base - low) * (1 + math.cos(math.pi * e / epochs)) / 2
    assert math.isclose(float(s(step)), want, rel_tol=1e-6), step


def test_reference_sgd_matches_pytorch_update_rule():
  """buf = m*buf + (g + wd*w); w -= lr*buf, with a learning rate that changes."""
  lrs = [0.1, 0.3, 0.05, 0.2]

  lr_var = tf.Variable(lrs[0], dtype=tf.float32)
  opt = schedules.ReferenceSGD(learning_rate=lambda: lr_var, momentum=0.9,
                               l2_weight_decay=1e-2)
  w = tf.Variable([1.0, -2.0, 0.5])
  opt.build([w])
  w_ref = np.array([1.0, -2.0, 0.5])
  buf = np.zeros(3)
  rs = np.random.RandomState(0)
  for lr in lrs:
    g = rs.randn(3).astype(np.float32)
    lr_var.assign(lr)
    opt.apply([tf.constant(g)], [w])
    d = g + 1e-2 * w_ref
    buf = 0.9 * buf + d
    w_ref = w_ref - lr * buf
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-5)
