"""Golden values of the loss over several steps against a NumPy float64 reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf.method import losses

HP = dict(alpha=250.0, cov_weight=1.0, la_R=0.01, la_mu=0.01, eps=1e-8)


def numpy_reference(batches, covariance, alpha, cov_weight, la_R, la_mu, eps, dim,
                    R_ini=1.0):
  """The authors' order of operations, written out in NumPy float64."""
  n_states = 2 if covariance == "per_branch" else 1
  mus = [np.zeros(dim) for _ in range(n_states)]
  Rs = [R_ini * np.eye(dim) for _ in range(n_states)]
  out = []
  for z1, z2 in batches:
    z1 = z1.astype(np.float64)
    z2 = z2.astype(np.float64)
    views = [z1, z2] if covariance == "per_branch" else [np.concatenate([z1, z2])]
    cov = 0.0
    for q, z in enumerate(views):
      mu_new = la_mu * mus[q] + (1 - la_mu) * z.mean(axis=0)
      zc = z - mu_new
      R_new = la_R * Rs[q] + (1 - la_R) * zc.T @ zc / z.shape[0]
      sign, ld = np.linalg.slogdet(R_new + eps * np.eye(dim))
      assert sign > 0
      cov += -ld / dim
      mus[q], Rs[q] = mu_new, R_new
    attraction = np.mean((z1 - z2) ** 2)
    out.append(dict(loss=alpha * attraction + cov_weight * cov, attraction=attraction,
                    cov=cov, mus=[m.copy() for m in mus], Rs=[r.copy() for r in Rs]))
  return out


def make_batches(steps=5, n=16, dim=8, seed=0):
  rs = np.random.RandomState(seed)
  batches = []
  for _ in range(steps):
    z1 = rs.randn(n, dim).astype(np.float32)
    z2 = (z1 + 0.3 * rs.randn(n, dim)).astype(np.float32)
    z1 /= np.linalg.norm(z1, axis=1, keepdims=True)
    z2 /= np.linalg.norm(z2, axis=1, keepdims=True)
    batches.append((z1, z2))
  return batches


@pytest.mark.parametrize("covariance", ["per_branch", "shared"])
def test_layer_matches_numpy_over_several_steps(covariance):
  batches = make_batches()
  expected = numpy_reference(batches, covariance, dim=8, **HP)
  layer = losses.CorInfoMaxLoss(dim=8, covariance=covariance, **HP)
  names = losses.state_names(covariance)
  for (z1, z2), ref in zip(batches, expected):
    terms = layer(tf.constant(z1), tf.constant(z2), training=True)
    for key in ("loss", "attraction", "cov"):
      assert terms[key].dtype == tf.float64
      np.testing.assert_allclose(terms[key].numpy(), ref[key], rtol=0, atol=1e-9)
    mus = [getattr(layer, n).numpy() for n in names if n.startswith("mu")]
    Rs = [getattr(layer, n).numpy() for n in names if n.startswith("R")]
    for got, want in zip(mus + Rs, ref["mus"] + ref["Rs"]):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_pure_function_matches_numpy_and_la_zero_uses_only_the_batch():
  batches = make_batches(steps=3)
  hp = dict(HP, la_R=0.0, la_mu=0.0)
  expected = numpy_reference(batches, "per_branch", dim=8, **hp)
  state = {"mu1": tf.zeros(8, tf.float64), "R1": tf.eye(8, dtype=tf.float64),
           "mu2": tf.zeros(8, tf.float64), "R2": tf.eye(8, dtype=tf.float64)}
  for (z1, z2), ref in zip(batches, expected):
    terms, state = losses.corinfomax_terms(z1, z2, state, **hp)
    np.testing.assert_allclose(terms["loss"].numpy(), ref["loss"], atol=1e-9, rtol=0)
  # With la = 0 the state is the last batch's own statistics.
  z1 = batches[-1][0].astype(np.float64)
  np.testing.assert_allclose(state["mu1"].numpy(), z1.mean(0), atol=1e-12)
  np.testing.assert_allclose(state["R1"].numpy(), np.cov(z1.T, bias=True), atol=1e-12)


def test_state_is_not_updated_when_not_training():
  layer = losses.CorInfoMaxLoss(dim=8, **HP)
  z1, z2 = make_batches(steps=1)[0]
  layer(z1, z2, training=False)
  np.testing.assert_array_equal(layer.mu1.numpy(), np.zeros(8))
  np.testing.assert_array_equal(layer.R1.numpy(), np.eye(8))
  layer(z1, z2, training=True)
  assert np.abs(layer.mu1.numpy()).sum() > 0
  layer.reset_state()
  np.testing.assert_array_equal(layer.R2.numpy(), np.eye(8))


def test_gradient_flows_only_through_the_current_batch():
  """Analytic gradient (through the new mean and covariance, not the stored state)
  equals a central finite difference of the pure function in float64."""
  rs = np.random.RandomState(1)
  z1 = tf.constant(rs.randn(6, 3))
  z2 = tf.constant(rs.randn(6, 3))
  A = rs.randn(3, 3)
  state = {"mu1": tf.constant(rs.randn(3)), "R1": tf.constant(A @ A.T + np.eye(3)),
           "mu2": tf.constant(rs.randn(3)), "R2": tf.constant(np.eye(3))}

  def loss_of(z):
    return losses.corinfomax_terms(z, z2, state, alpha=2.0, cov_weight=1.0, la_R=0.3,
                                   la_mu=0.2, eps=1e-8)[0]["loss"]

  theoretical, numerical = tf.test.compute_gradient(loss_of, [z1], delta=1e-6)
  np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
  with tf.GradientTape() as tape:
    tape.watch(list(state.values()))
    value = loss_of(z1)
  assert all(g is None for g in tape.gradient(value, list(state.values())))


def test_closed_form_gradient_equals_autodiff_through_cholesky():
  """The custom gradient of covariance_and_logdet equals differentiating
  updated_covariance + logdet (through the Cholesky) in float64."""
  rs = np.random.RandomState(3)
  A = rs.randn(5, 5)
  R = tf.constant(A @ A.T / 5 + np.eye(5))
  zc = tf.constant(rs.randn(7, 5))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(zc)
    fast_R, fast = losses.covariance_and_logdet(R, zc, 0.3, 1e-6)
    slow_R = losses.updated_covariance(R, zc, 0.3)
    slow = losses.logdet(slow_R, 1e-6)
  np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-12)
  np.testing.assert_allclose(fast_R.numpy(), slow_R.numpy(), atol=1e-14)
  np.testing.assert_allclose(tape.gradient(fast, zc).numpy(), tape.gradient(slow, zc).numpy(),
                             atol=1e-10)
  assert tape.gradient(fast_R, zc) is None


def test_logdet_matches_numpy_and_is_nan_free_on_rounding_asymmetry():
  rs = np.random.RandomState(2)
  A = rs.randn(5, 5)
  R = A @ A.T
  R_asym = R + 1e-13 * rs.randn(5, 5)
  got = losses.logdet(tf.constant(R_asym), 1e-8).numpy()
  np.testing.assert_allclose(got, np.linalg.slogdet(R + 1e-8 * np.eye(5))[1], atol=1e-9)


def test_variables_stay_float64_under_mixed_precision():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    layer = losses.CorInfoMaxLoss(dim=4, alpha=1.0)
    z = tf.random.normal((8, 4), dtype=tf.bfloat16)
    terms = layer(z, z * 0.5, training=True)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert all(v.dtype == "float64" for v in layer.weights)
  assert terms["cov"].dtype == tf.float64
  assert [w.name for w in layer.weights] == ["mu1", "R1", "mu2", "R2", "R12"]
  assert not layer.trainable_weights


def test_config_round_trip():
  layer = losses.CorInfoMaxLoss(dim=16, alpha=1000.0, la_R=0.1, la_mu=0.1,
                                covariance="shared")
  clone = losses.CorInfoMaxLoss.from_config(layer.get_config())
  assert clone.get_config() == layer.get_config()
  assert [w.name for w in clone.weights] == ["mu", "R", "R12"]
  np.testing.assert_array_equal(clone.R.numpy(), np.eye(16))


@pytest.mark.parametrize("kwargs, message", [
    (dict(la_R=1.0), "la_R must be in [0, 1). Received: la_R=1.0"),
    (dict(la_mu=-0.1), "la_mu must be in [0, 1)"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(covariance="joint"), "covariance must be one of"),
    (dict(dim=0), "dim must be a positive integer"),
])
def test_bad_arguments_are_named(kwargs, message):
  args = dict(dim=4, alpha=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    losses.CorInfoMaxLoss(**args)


def test_cross_covariance_follows_the_views():
  batches = make_batches(steps=3)
  layer = losses.CorInfoMaxLoss(dim=8, **HP)
  R12 = np.zeros((8, 8))
  mu1, mu2 = np.zeros(8), np.zeros(8)
  for z1, z2 in batches:
    layer(z1, z2, training=True)
    mu1 = 0.01 * mu1 + 0.99 * z1.mean(0)
    mu2 = 0.01 * mu2 + 0.99 * z2.mean(0)
    R12 = 0.01 * R12 + 0.99 * (z1 - mu1).T @ (z2 - mu2) / len(z1)
  np.testing.assert_allclose(layer.R12.numpy(), R12, atol=1e-9)
  assert losses.CorInfoMaxLoss(dim=4, alpha=1.0, track_cross_covariance=False).R12 is None
