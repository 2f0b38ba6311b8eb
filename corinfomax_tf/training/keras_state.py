"""Keras variables of any backend in a TensorFlow checkpoint.

On TensorFlow, Keras variables are TensorFlow variables and `tf.train.Checkpoint`
tracks the model itself. On JAX they are not: `KerasVariables` holds one TensorFlow
variable per Keras variable (same shape and dtype), copies the Keras values in before
a save (`pull`) and back after a restore (`push`), bit for bit. So a JAX run keeps
the workdir's whole checkpoint machinery (the manager, damaged-checkpoint recovery,
the atomic pointer file) and its checkpoints are read on either backend.

The variables are keyed by position: a model rebuilt from the workdir's
architecture creates its variables in the same order on either backend (layer names
may differ between processes; positions do not), and the restore checks every shape.
"""

import types

import numpy as np
import tensorflow as tf


class KerasVariables(tf.Module):
  """TensorFlow mirrors of a list of Keras variables, for `tf.train.Checkpoint`.

  Args:
    variables: Keras variables (any backend), in a stable order (`layer.variables`,
      `optimizer.variables`).
  """

  def __init__(self, variables, name=None):
    super().__init__(name=name)
    # Not tracked: on TensorFlow the Keras variables are tf.Variables themselves, and
    # the checkpoint must hold the mirrors only.
    self._keras = types.SimpleNamespace(variables=list(variables))
    self.values = {f"v{i:05d}": tf.Variable(tf.zeros(v.shape, tf.as_dtype(v.dtype)),
                                            trainable=False)
                   for i, v in enumerate(self._keras.variables)}

  def _pairs(self):
    count = len(self._keras.variables)
    return zip(self._keras.variables, (self.values[f"v{i:05d}"] for i in range(count)))

  def pull(self):
    """Keras values -> the TensorFlow mirrors (before a save)."""
    for keras_variable, mirror in self._pairs():
      mirror.assign(np.asarray(keras_variable.value))

  def push(self):
    """The TensorFlow mirrors -> the Keras variables (after a restore)."""
    for keras_variable, mirror in self._pairs():
      keras_variable.assign(mirror.numpy())


def mirrored(tracked):
  """A checkpoint's tracked objects (name -> a Keras layer, optimizer or variable) as
  KerasVariables of their variables, under the same names."""
  return {name: KerasVariables(getattr(obj, "variables", [obj]), name=name)
          for name, obj in tracked.items()}


def mirrors_in(tracked):
  """The KerasVariables among a checkpoint's tracked objects."""
  return [obj for obj in tracked.values() if isinstance(obj, KerasVariables)]
