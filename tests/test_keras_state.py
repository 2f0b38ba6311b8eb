"""keras_state.KerasVariables: Keras variables in a TensorFlow checkpoint by position
(how a run on JAX checkpoints; here on TensorFlow, where the same code reads it)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf import errors

from corinfomax_tf.training import keras_state
from corinfomax_tf.training import workdir as workdir_lib


def _model(seed):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((4,))
  x = keras.layers.Dense(3)(inputs)
  x = keras.layers.BatchNormalization()(x)
  return keras.Model(inputs, keras.layers.Dense(2)(x))


def test_a_mirror_checkpoint_restores_every_value_bitwise_into_another_model(tmp_path):
  source, target = _model(0), _model(1)
  step = keras.Variable(7, dtype="int64", trainable=False)
  mirror = keras_state.KerasVariables(source.variables, name="encoder")
  step_mirror = keras_state.KerasVariables([step], name="step")
  checkpoints = workdir_lib.Checkpoints(tf.train.Checkpoint(encoder=mirror, step=step_mirror),
                                        str(tmp_path), keep=2,
                                        mirrors=[mirror, step_mirror])
  checkpoints.save(7)
  # Only the mirrors are in the checkpoint, keyed by position.
  names = [name for name, _ in tf.train.list_variables(str(tmp_path))
           if "VARIABLE_VALUE" in name and not name.startswith("save_counter")]
  assert sorted(names) == sorted(
      [f"encoder/values/v{i:05d}/.ATTRIBUTES/VARIABLE_VALUE"
       for i in range(len(source.variables))] + ["step/values/v00000/.ATTRIBUTES/"
                                                 "VARIABLE_VALUE"])
  assert not all(np.array_equal(a.numpy(), b.numpy())
                 for a, b in zip(source.variables, target.variables))
  new_step = keras.Variable(0, dtype="int64", trainable=False)
  mirror2 = keras_state.KerasVariables(target.variables, name="encoder")
  step2 = keras_state.KerasVariables([new_step], name="step")
  reader = workdir_lib.Checkpoints(tf.train.Checkpoint(encoder=mirror2, step=step2),
                                   str(tmp_path), keep=1, chief=False,
                                   mirrors=[mirror2, step2])
  assert reader.restore_latest() == os.path.join(str(tmp_path), "ckpt-7")
  for a, b in zip(source.variables, target.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert int(new_step.numpy()) == 7


def test_another_architecture_is_not_restored(tmp_path):
  source = _model(0)
  mirror = keras_state.KerasVariables(source.variables, name="encoder")
  workdir_lib.Checkpoints(tf.train.Checkpoint(encoder=mirror), str(tmp_path), keep=1,
                          mirrors=[mirror]).save(1)
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  other = keras.Model(inputs, keras.layers.Dense(5)(inputs))   # other shapes
  before = [v.numpy().copy() for v in other.variables]
  mirror2 = keras_state.KerasVariables(other.variables, name="encoder")
  reader = workdir_lib.Checkpoints(tf.train.Checkpoint(encoder=mirror2), str(tmp_path),
                                   keep=1, chief=False, mirrors=[mirror2], log=lambda _: None)
  with pytest.raises(errors.WorkdirError, match="no intact checkpoint"):
    reader.restore_latest()
  for value, v in zip(before, other.variables):
    np.testing.assert_array_equal(value, v.numpy())   # nothing pushed
