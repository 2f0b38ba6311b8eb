"""FusedBatchNormalization: one fused op in training, the Keras layer's statistics and
gradients to float32 rounding, the Keras layer bit for bit where it does not fuse; the
ResNet and the training step with it (`--fused_batch_norm`)."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf import config as config_lib
from corinfomax_tf.method import model as ssl_model
from corinfomax_tf.models import backbone as backbone_lib
from corinfomax_tf.models.fused_batch_norm import FusedBatchNormalization
from corinfomax_tf.training import schedules


def _pair(**kwargs):
  """A Keras BatchNormalization and a fused one with the same (non-trivial) weights."""
  plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)
  fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)
  rs = np.random.RandomState(0)
  plain.build((None, 5, 5, 3))
  fused.build((None, 5, 5, 3))
  fused.set_weights([rs.rand(*w.shape).astype(w.dtype) + 0.5 for w in plain.weights])
  plain.set_weights(fused.get_weights())
  return plain, fused


def _op_types(layer, x, training):
  fn = tf.function(lambda x: layer(x, training=training))
  return {op.type for op in fn.get_concrete_function(x).graph.get_operations()}


def test_training_mode_is_one_fused_op_with_the_keras_layers_values_and_gradients():
  plain, fused = _pair()
  x = tf.constant(np.random.RandomState(1).randn(6, 5, 5, 3).astype("float32") * 2 + 1)
  assert "FusedBatchNormV3" in _op_types(fused, x, True)
  assert "FusedBatchNormV3" not in _op_types(plain, x, True)
  plain, fused = _pair()   # the traces above updated the statistics: start again
  before = fused.moving_variance.numpy().copy()
  outputs, grads = [], []
  for layer in (plain, fused):
    with tf.GradientTape() as tape:
      tape.watch(x)
      outputs.append(layer(x, training=True))
      loss = tf.reduce_sum(outputs[-1] * tf.sin(x))
    grads.append(tape.gradient(loss, [x, *layer.trainable_variables]))
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
  for g_plain, g_fused in zip(*grads):
    np.testing.assert_allclose(g_fused, g_plain, rtol=1e-4, atol=1e-5)
  # The moving statistics blend the same (biased) batch variance.
  for w_plain, w_fused in zip(plain.non_trainable_weights, fused.non_trainable_weights):
    np.testing.assert_allclose(w_fused.numpy(), w_plain.numpy(), rtol=1e-6)
  assert not np.allclose(fused.moving_variance.numpy(), before)   # they moved


@pytest.mark.parametrize("case", ["inference", "float64", "synchronized"])
def test_where_it_does_not_fuse_it_is_the_keras_layer_bit_for_bit(case):
  if case == "float64":
    plain, fused = (keras.layers.BatchNormalization(dtype="float64"),
                    FusedBatchNormalization(dtype="float64"))
  else:
    plain, fused = _pair(synchronized=case == "synchronized")
  x = tf.constant(np.random.RandomState(2).randn(4, 5, 5, 3).astype(
      "float64" if case == "float64" else "float32"))
  training = case != "inference"
  assert "FusedBatchNormV3" not in _op_types(fused, x, training)
  np.testing.assert_array_equal(fused(x, training=training), plain(x, training=training))


def test_without_scale_and_offset_it_fuses_with_gamma_one_and_beta_zero():
  plain, fused = _pair(scale=False, center=False)
  x = tf.constant(np.random.RandomState(2).randn(4, 5, 5, 3).astype("float32"))
  np.testing.assert_allclose(fused(x, training=True), plain(x, training=True),
                             rtol=1e-5, atol=1e-5)


def test_the_resnet_with_it_has_the_same_weights_and_features_to_rounding():
  plain = backbone_lib.CorInfoMaxBackbone(depth=18, width=2, image_size=8)
  fused = backbone_lib.CorInfoMaxBackbone(depth=18, width=2, image_size=8,
                                          fused_batch_norm=True)
  bn = [l for l in fused.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert bn and all(isinstance(l, FusedBatchNormalization) for l in bn)
  assert not any(isinstance(l, FusedBatchNormalization) for l in plain.layers)
  assert [w.path for w in fused.weights] == [w.path for w in plain.weights]
  fused.set_weights(plain.get_weights())
  x = np.random.RandomState(3).rand(4, 8, 8, 3).astype("float32")
  # Inference first: a training call moves the statistics (by rounding, differently).
  np.testing.assert_array_equal(fused(x, training=False), plain(x, training=False))
  np.testing.assert_allclose(fused(x, training=True), plain(x, training=True),
                             rtol=1e-4, atol=1e-5)


def test_the_flag_builds_it_and_the_step_trains_as_the_default_to_rounding():
  model_cfg = config_lib.ModelConfig(width=2, projector="16-8")
  loss_cfg = config_lib.LossConfig()
  views = tf.constant(np.random.RandomState(4).rand(8, 2, 8, 8, 3).astype("float32"))
  losses = {}
  for fused in (False, True):
    keras.utils.set_random_seed(0)
    model = ssl_model.build_pretraining_model(
        dataclasses.replace(model_cfg, fused_batch_norm=fused), loss_cfg,
        image_size=8)
    assert any(isinstance(l, FusedBatchNormalization)
               for l in model.encoder.layers) == fused
    optimizer = schedules.ReferenceSGD(0.1, momentum=0.9, l2_weight_decay=1e-4)
    model.compile(optimizer=optimizer)
    optimizer.build(model.pretraining_variables)
    step = tf.function(lambda v: model.train_step((v, tf.zeros([8], tf.int64))))
    losses[fused] = [float(step(views)["loss"]) for _ in range(3)]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
