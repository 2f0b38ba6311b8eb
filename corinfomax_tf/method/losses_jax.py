"""The CorInfoMax loss terms in JAX, for Keras' JAX backend.

The same functions as `corinfomax_tf.method.losses`, in the same order of operations
(docs/fidelity.md): the new running mean first, the batch centred with it, the
biased batch covariance blended into the running one, -logdet(R_new + eps*I) / D.
The log-determinant has the same closed-form gradient, 2(1-la_R)/N * Zc A^-1, from
the Cholesky factor the value needed (`jax.custom_vjp`), instead of JAX
differentiating through the decomposition.

Float64 needs JAX's 64-bit mode: `enable_float64()` turns it on (the loss layer calls
it when it is built on this backend); the network itself keeps its own dtype. Tested
against the TensorFlow functions to 1e-12 in float64 (tests/test_jax_backend.py).
This module imports JAX: only the JAX backend imports it.
"""

import functools
import types

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from corinfomax_tf.method import losses


def enable_float64():
  """Turns on JAX's 64-bit mode (float64 arrays stay float64), once per process.

  It must be on before the loss's float64 state is created: without it JAX makes
  every float64 array float32, silently.
  """
  if not jax.config.jax_enable_x64:
    jax.config.update("jax_enable_x64", True)


def stop_gradient(x):
  return jax.lax.stop_gradient(x)


_stop = stop_gradient


def updated_mean(mu, z, la_mu):
  """mu_new = la_mu * mu + (1 - la_mu) * mean_over_batch(z)."""
  return la_mu * _stop(mu) + (1.0 - la_mu) * jnp.mean(z, axis=0)


def _cholesky_of_updated(R, zc, la_R, eps):
  n = zc.shape[0]
  R_new = la_R * R + (1.0 - la_R) * (zc.T @ zc) / n
  sym = 0.5 * (R_new + R_new.T) + eps * jnp.eye(R_new.shape[-1], dtype=zc.dtype)
  return R_new, jnp.linalg.cholesky(sym)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def covariance_and_logdet(R, z_centred, la_R, eps):
  """(R_new, logdet(R_new + eps*I)); the gradient flows to `z_centred` only."""
  (R_new, value), _ = _forward(_stop(R), z_centred, la_R, eps)
  return _stop(R_new), value


def _forward(R, z_centred, la_R, eps):
  R_new, chol = _cholesky_of_updated(R, z_centred, la_R, eps)
  value = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
  return (R_new, value), (R, z_centred, chol)


def _backward(la_R, eps, residuals, cotangents):
  R, zc, chol = residuals
  _, d_value = cotangents   # R_new is state: never differentiated
  n = zc.shape[0]
  a_inv_zc_t = cho_solve((chol, True), zc.T)
  return jnp.zeros_like(R), d_value * (2.0 * (1.0 - la_R) / n) * a_inv_zc_t.T


covariance_and_logdet.defvjp(_forward, _backward)


def branch_terms(mu, R, z, la_mu, la_R, eps):
  """One branch's new state and log-determinant: (mu_new, R_new, logdet)."""
  mu_new = updated_mean(mu, z, la_mu)
  R_new, value = covariance_and_logdet(R, z - mu_new, la_R, eps)
  return mu_new, R_new, value


# The array functions `losses.corinfomax_terms` uses, JAX's: the same driver computes
# the terms on both backends.
def _float64(z):
  if not jax.config.jax_enable_x64:
    raise RuntimeError("The CorInfoMax loss needs JAX's 64-bit mode, which is off: call "
                       "corinfomax_tf.method.losses_jax.enable_float64() before creating "
                       "its arrays (CorInfoMaxLoss does this itself)")
  return jnp.asarray(z).astype(jnp.float64)


JAX_MATH = types.SimpleNamespace(
    float64=_float64,
    width=lambda z: float(z.shape[-1]),
    attraction_term=lambda z1, z2: jnp.mean(jnp.square(z1 - z2)),
    branch_terms=branch_terms,
    concat=lambda a, b: jnp.concatenate([a, b], axis=0))


def corinfomax_terms(z1, z2, state, **kwargs):
  """`losses.corinfomax_terms` on JAX arrays: (terms, new_state)."""
  return losses.corinfomax_terms(z1, z2, state, math=JAX_MATH, **kwargs)


def updated_cross_covariance(R12, z1_centred, z2_centred, la_R):
  """Running cross-covariance of the two views (monitoring only, no gradient)."""
  n = z1_centred.shape[0]
  return la_R * R12 + (1.0 - la_R) * (z1_centred.T @ z2_centred) / n
