"""`CorInfoMax`'s training and evaluation steps on Keras' JAX backend.

Keras' JAX trainer keeps every variable outside the model and calls
`train_step(state, data)` with state = (trainable, non_trainable, optimizer, metrics)
values, expecting (logs, new state) back. These steps run the model's own forward
pass (`CorInfoMax.compute_loss_terms`) inside a `keras.StatelessScope` that maps each
variable to its value in `state`; the loss layer's running means and covariances,
BatchNorm's moving statistics and the step counter are non-trainable variables whose
assignments the scope records, so they come back as the new non-trainable state.

Several devices: under `keras.distribution.DataParallel` the batch is sharded over
the devices and the step is one program over the global batch (JAX's SPMD), so the
loss, its covariance update and BatchNorm's statistics see the whole batch, as one
device on the concatenated batch does (tested with 2 CPU devices).

This module imports JAX: only the JAX backend imports it.
"""

import jax
import jax.numpy as jnp
import keras


def _values_after(scope, variables, values):
  """Each variable's value after the scope: the assigned one, else as it came."""
  out = []
  for variable, value in zip(variables, values):
    new = scope.get_current_value(variable)
    out.append(value if new is None else new)
  return out


def _forward(model, trainable, non_trainable, x1, x2, training):
  mapping = list(zip(model.trainable_variables, trainable)) + list(
      zip(model.non_trainable_variables, non_trainable))
  with keras.StatelessScope(state_mapping=mapping) as scope:
    terms = model.compute_loss_terms(x1, x2, training=training)
    if training:
      model.step_counter.assign_add(1)
  return terms, _values_after(scope, model.non_trainable_variables, non_trainable)


def _logs(model, metrics, terms):
  with keras.StatelessScope(state_mapping=list(zip(model.metrics_variables, metrics))
                            ) as scope:
    logs = model._update_metrics(terms)
  return logs, _values_after(scope, model.metrics_variables, metrics)


def train_step(model, state, data):
  """One pretraining step: (logs, new state)."""
  trainable, non_trainable, optimizer_values, metrics = state
  views, _ = model._unpack(data)
  x1, x2 = views[:, 0], views[:, 1]

  def loss_fn(trainable):
    terms, new_non_trainable = _forward(model, trainable, non_trainable, x1, x2, True)
    loss = terms["loss"].astype(jnp.float32)
    return loss, (terms, new_non_trainable)

  (_, (terms, non_trainable)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      trainable)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads))
  trainable, optimizer_values = model.optimizer.stateless_apply(
      optimizer_values, grads, trainable)
  logs, metrics = _logs(model, metrics, {**terms, "grad_norm": grad_norm})
  return logs, (trainable, non_trainable, optimizer_values, metrics)


def test_step(model, state, data):
  """The loss terms of a batch, nothing trained: (logs, new state)."""
  trainable, non_trainable, metrics = state
  views, _ = model._unpack(data)
  terms, non_trainable = _forward(model, trainable, non_trainable, views[:, 0],
                                  views[:, 1], False)
  logs, metrics = _logs(model, metrics, {**terms, "grad_norm": jnp.zeros((), jnp.float32)})
  return logs, (trainable, non_trainable, metrics)
