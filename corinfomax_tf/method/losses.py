"""The CorInfoMax loss: pure functions for its terms and a layer that owns the state.

The order of operations follows the authors' code (see docs/fidelity.md):
for each view, the new running mean comes first, the batch is centred with that NEW
mean, the biased covariance of the centred batch is blended into the running
covariance, and the big-bang term is -logdet(R_new + eps*I) / D. The stored mean and
covariance never carry gradient: only the current batch's contribution does.

All covariance and log-determinant arithmetic is float64 whatever the model's
precision, because the log-determinant of a 2048x2048 covariance is ill-conditioned
in float32.
"""

import types

import keras
import tensorflow as tf

from corinfomax_tf.method.loss_args import COVARIANCE_MODES, validate_loss_args  # noqa: F401

# ----------------------------------------------------------------------------
# Pure functions. Every argument is explicit; nothing here holds state.
# ----------------------------------------------------------------------------


def updated_mean(mu, z, la_mu):
  """mu_new = la_mu * mu + (1 - la_mu) * mean_over_batch(z)."""
  return la_mu * tf.stop_gradient(mu) + (1.0 - la_mu) * tf.reduce_mean(z, axis=0)


def updated_covariance(R, z_centred, la_R):
  """R_new = la_R * R + (1 - la_R) * Zc^T Zc / N (biased, divided by N)."""
  n = tf.cast(tf.shape(z_centred)[0], z_centred.dtype)
  batch_cov = tf.matmul(z_centred, z_centred, transpose_a=True) / n
  return la_R * tf.stop_gradient(R) + (1.0 - la_R) * batch_cov


def logdet(matrix, eps):
  """log det(matrix + eps*I) of a symmetric matrix, by Cholesky.

  The matrix is symmetrised first: a covariance built by matmul is symmetric only up
  to rounding, and Cholesky reads one triangle. A matrix that is not positive
  definite gives NaN (Cholesky's diagonal), which callers must check: the training
  step turns a non-finite loss into a clear error instead of a silent update.
  """
  d = tf.shape(matrix)[-1]
  sym = 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))
  sym = sym + eps * tf.eye(d, dtype=matrix.dtype)
  chol = tf.linalg.cholesky(sym)
  return 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)), axis=-1)


def covariance_term(R_new, eps):
  """The big-bang term of one covariance: -logdet(R_new + eps*I) / D."""
  d = tf.cast(tf.shape(R_new)[-1], R_new.dtype)
  return -logdet(R_new, eps) / d


def attraction_term(z1, z2):
  """mean((z1 - z2)^2) over all N*D entries (PyTorch's F.mse_loss)."""
  return tf.reduce_mean(tf.square(z1 - z2))


def branch_update(mu, R, z, la_mu, la_R):
  """One view's (or the stacked views') state update: returns (mu_new, R_new)."""
  mu_new = updated_mean(mu, z, la_mu)
  R_new = updated_covariance(R, z - mu_new, la_R)
  return mu_new, R_new


def covariance_and_logdet(R, z_centred, la_R, eps):
  """(R_new, logdet(R_new + eps*I)) with a closed-form gradient w.r.t. z_centred.

  Same values as `updated_covariance` then `logdet`. The gradient of
  f(Zc) = logdet(la_R*R + (1-la_R)*Zc^T Zc/N + eps*I) is 2(1-la_R)/N * Zc A^-1, and
  A^-1 Zc^T comes from two triangular solves with the Cholesky factor the value
  already needed: O(D^2 N), where differentiating through the Cholesky
  decomposition costs O(D^3) in float64 (about 90% of the loss's time at D = 2048 on
  a CPU). R_new is returned without gradient: it is the state to store.
  """
  R = tf.stop_gradient(R)

  @tf.custom_gradient
  def value_and_grad(zc):
    n = tf.cast(tf.shape(zc)[0], zc.dtype)
    R_new = la_R * R + (1.0 - la_R) * tf.matmul(zc, zc, transpose_a=True) / n
    d = tf.shape(R_new)[-1]
    sym = 0.5 * (R_new + tf.linalg.matrix_transpose(R_new)) + eps * tf.eye(d, dtype=zc.dtype)
    chol = tf.linalg.cholesky(sym)
    value = 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))

    def grad(d_R_new, d_value):
      del d_R_new  # state: never differentiated (stop_gradient below)
      a_inv_zc_t = tf.linalg.cholesky_solve(chol, tf.transpose(zc))
      return d_value * (2.0 * (1.0 - la_R) / n) * tf.transpose(a_inv_zc_t)
    return (R_new, value), grad

  R_new, value = value_and_grad(z_centred)
  return tf.stop_gradient(R_new), value


def branch_terms(mu, R, z, la_mu, la_R, eps):
  """One branch's new state and log-determinant: (mu_new, R_new, logdet)."""
  mu_new = updated_mean(mu, z, la_mu)
  R_new, value = covariance_and_logdet(R, z - mu_new, la_R, eps)
  return mu_new, R_new, value


def corinfomax_terms(z1, z2, state, *, alpha, cov_weight, la_R, la_mu, eps,
                     covariance="per_branch", math=None):
  """Loss terms and the next state for one step.

  Args:
    z1, z2: (N, D) projector outputs of the two views (any float dtype; promoted
      to float64).
    state: dict with "mu1", "R1", "mu2", "R2" (per_branch) or "mu", "R" (shared).
    alpha, cov_weight, la_R, la_mu, eps: the loss hyperparameters.
    covariance: "per_branch" or "shared".
    math: the array functions (`TF_MATH`, or `losses_jax.JAX_MATH` on Keras' JAX
      backend); None: TensorFlow's.

  Returns:
    (terms, new_state): terms is a dict with float64 scalars "loss", "attraction",
    "cov" and the log-determinants ("logdet1"/"logdet2" or "logdet"); new_state
    has the same keys as `state`.
  """
  m = math or TF_MATH
  z1 = m.float64(z1)
  z2 = m.float64(z2)
  d = m.width(z1)
  attraction = m.attraction_term(z1, z2)
  terms = {"attraction": attraction}
  if covariance == "per_branch":
    mu1, R1, terms["logdet1"] = m.branch_terms(state["mu1"], state["R1"], z1, la_mu, la_R,
                                               eps)
    mu2, R2, terms["logdet2"] = m.branch_terms(state["mu2"], state["R2"], z2, la_mu, la_R,
                                               eps)
    cov = -(terms["logdet1"] + terms["logdet2"]) / d
    new_state = {"mu1": mu1, "R1": R1, "mu2": mu2, "R2": R2}
  elif covariance == "shared":
    mu, R, terms["logdet"] = m.branch_terms(state["mu"], state["R"], m.concat(z1, z2),
                                            la_mu, la_R, eps)
    cov = -terms["logdet"] / d
    new_state = {"mu": mu, "R": R}
  else:
    raise ValueError(f"covariance must be one of {COVARIANCE_MODES}. "
                     f"Received: covariance={covariance!r}")
  terms["cov"] = cov
  terms["loss"] = alpha * attraction + cov_weight * cov
  return terms, new_state


# The array functions `corinfomax_terms` uses, TensorFlow's.
TF_MATH = types.SimpleNamespace(
    float64=lambda z: tf.cast(z, tf.float64),
    width=lambda z: tf.cast(tf.shape(z)[-1], tf.float64),
    attraction_term=attraction_term, branch_terms=branch_terms,
    concat=lambda a, b: tf.concat([a, b], axis=0))


def updated_cross_covariance(R12, z1_centred, z2_centred, la_R):
  """Running cross-covariance of the two views (monitoring only, no gradient)."""
  n = tf.cast(tf.shape(z1_centred)[0], z1_centred.dtype)
  batch = tf.matmul(z1_centred, z2_centred, transpose_a=True) / n
  return la_R * R12 + (1.0 - la_R) * batch


def state_names(covariance):
  if covariance == "per_branch":
    return ("mu1", "R1", "mu2", "R2")
  if covariance == "shared":
    return ("mu", "R")
  raise ValueError(f"covariance must be one of {COVARIANCE_MODES}. "
                   f"Received: covariance={covariance!r}")


# ----------------------------------------------------------------------------
# The stateful layer.
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class CorInfoMaxLoss(keras.layers.Layer):
  """CorInfoMax loss holding the running means and covariances.

  Like BatchNormalization, the layer owns non-trainable statistics that it updates
  only when `training=True`. Its variables are float64 and never autocast, so a
  mixed-precision policy elsewhere leaves them alone.

  Under a tf.distribute strategy, call it with the projector outputs gathered over
  all replicas: every replica then computes the same new state, and the variables
  use aggregation "only_first_replica" so that the write is one value everywhere.

  Args:
    dim: D, the width of the projector's output.
    alpha: weight of the attraction term, mean((z1 - z2)^2).
    cov_weight: weight of the covariance ("big-bang") term, -logdet(R + eps*I) / D.
    la_R: forgetting factor of the running covariances R (in [0, 1)).
    la_mu: forgetting factor of the running means mu (in [0, 1)).
    eps: the ridge eps*I added before the log-determinant (> 0).
    R_ini: the covariances start at R_ini * I.
    covariance: "per_branch" (R1, R2, as the paper) or "shared" (one R of both views).
    track_cross_covariance: also keep the running cross-covariance R12 (the LDMI
      monitor reads it; it never enters the loss).

  Call arguments:
    z1, z2: the two views' projector outputs, [N, D] (float32 or float64).
    training: update mu and R (True) or only read them.

  Returns:
    A dict of float64 scalars: "loss" (alpha * attraction + cov_weight * cov),
    "attraction", "cov", "logdet1", "logdet2".

  Example:

  ```python
  loss_layer = corinfomax_tf.CorInfoMaxLoss(dim=64, alpha=1000.0)
  z1, z2 = projector(encoder(view1)), projector(encoder(view2))
  terms = loss_layer(z1, z2, training=True)
  terms["loss"]
  ```
  """

  def __init__(self, dim, alpha, cov_weight=1.0, la_R=0.01, la_mu=0.01, eps=1e-8,
               R_ini=1.0, covariance="per_branch", track_cross_covariance=True, **kwargs):
    kwargs.setdefault("dtype", "float64")
    kwargs["autocast"] = False
    super().__init__(**kwargs)
    validate_loss_args(dim=dim, alpha=alpha, cov_weight=cov_weight, la_R=la_R,
                       la_mu=la_mu, eps=eps, R_ini=R_ini, covariance=covariance)
    self.dim = int(dim)
    self.alpha = float(alpha)
    self.cov_weight = float(cov_weight)
    self.la_R = float(la_R)
    self.la_mu = float(la_mu)
    self.eps = float(eps)
    self.R_ini = float(R_ini)
    self.covariance = covariance
    self.track_cross_covariance = bool(track_cross_covariance)
    if keras.backend.backend() == "jax":
      from corinfomax_tf.method import losses_jax   # JAX is optional: only this backend
      losses_jax.enable_float64()   # before the float64 state below is created
    self._build_state()
    self.built = True

  def _build_state(self):
    eye = keras.initializers.Identity(gain=self.R_ini)
    for name in state_names(self.covariance):
      is_cov = name.startswith("R")
      shape = (self.dim, self.dim) if is_cov else (self.dim,)
      var = self.add_weight(
          name=name, shape=shape, dtype="float64", trainable=False,
          initializer=eye if is_cov else "zeros",
          aggregation="only_first_replica")
      setattr(self, name, var)
    # The two views' running cross-covariance, for the LDMI estimate the monitor
    # logs (the paper's equation 1). It never enters the loss or its gradient.
    self.R12 = None
    if self.track_cross_covariance:
      self.R12 = self.add_weight(name="R12", shape=(self.dim, self.dim), dtype="float64",
                                 trainable=False, initializer="zeros",
                                 aggregation="only_first_replica")

  def build(self, *args, **kwargs):
    # State is created in __init__ so that it exists, inside the caller's strategy
    # scope, before any distributed step runs.
    pass

  @property
  def state(self):
    return {name: getattr(self, name) for name in state_names(self.covariance)}

  def reset_state(self):
    for name, var in self.state.items():
      if name.startswith("R"):
        var.assign(self.R_ini * tf.eye(self.dim, dtype=tf.float64))
      else:
        var.assign(tf.zeros_like(var))
    if self.R12 is not None:
      self.R12.assign(tf.zeros_like(self.R12))

  def call(self, z1, z2, training=False):
    if z1.shape[-1] is not None and z1.shape[-1] != self.dim:
      raise ValueError(f"CorInfoMaxLoss was built for dim={self.dim}. "
                       f"Received: z1 with shape {z1.shape}")
    if keras.backend.backend() == "jax":
      return self._call_jax(z1, z2, training)
    current = {name: tf.convert_to_tensor(var) for name, var in self.state.items()}
    terms, new_state = corinfomax_terms(
        z1, z2, current, alpha=self.alpha, cov_weight=self.cov_weight,
        la_R=self.la_R, la_mu=self.la_mu, eps=self.eps, covariance=self.covariance)
    if training:
      for name, value in new_state.items():
        getattr(self, name).assign(tf.stop_gradient(value))
      if self.R12 is not None:
        z1c, z2c = self._centred_views(tf.stop_gradient(tf.cast(z1, tf.float64)),
                                       tf.stop_gradient(tf.cast(z2, tf.float64)),
                                       new_state)
        self.R12.assign(updated_cross_covariance(
            tf.convert_to_tensor(self.R12), z1c, z2c, self.la_R))
    return terms

  def _call_jax(self, z1, z2, training):
    """The same terms and state updates on Keras' JAX backend (float64: JAX's 64-bit
    mode, which `__init__` turned on)."""
    from corinfomax_tf.method import losses_jax   # JAX is optional: only this backend
    current = {name: var.value for name, var in self.state.items()}
    terms, new_state = losses_jax.corinfomax_terms(
        z1, z2, current, alpha=self.alpha, cov_weight=self.cov_weight,
        la_R=self.la_R, la_mu=self.la_mu, eps=self.eps, covariance=self.covariance)
    if training:
      for name, value in new_state.items():
        getattr(self, name).assign(value)
      if self.R12 is not None:
        stopped = [losses_jax.JAX_MATH.float64(losses_jax.stop_gradient(z)) for z in (z1, z2)]
        z1c, z2c = self._centred_views(*stopped, new_state)
        self.R12.assign(losses_jax.updated_cross_covariance(self.R12.value, z1c, z2c,
                                                            self.la_R))
    return terms

  def _centred_views(self, z1, z2, new_state):
    if self.covariance == "per_branch":
      return z1 - new_state["mu1"], z2 - new_state["mu2"]
    return z1 - new_state["mu"], z2 - new_state["mu"]

  def compute_output_spec(self, z1, z2, training=False):
    scalar = keras.KerasTensor((), dtype="float64")
    names = ["loss", "attraction", "cov"] + (
        ["logdet1", "logdet2"] if self.covariance == "per_branch" else ["logdet"])
    return {name: scalar for name in names}

  def get_config(self):
    config = super().get_config()
    config.update(dim=self.dim, alpha=self.alpha, cov_weight=self.cov_weight,
                  la_R=self.la_R, la_mu=self.la_mu, eps=self.eps, R_ini=self.R_ini,
                  covariance=self.covariance,
                  track_cross_covariance=self.track_cross_covariance)
    return config
