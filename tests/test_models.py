"""Encoders (keras-hub backbones) and projector: shapes, pyramid levels, zero-init
residual gamma, config round trips, keras-hub tasks on the backbone."""

import keras
import numpy as np
import pytest

from corinfomax_tf.models import backbone as backbone_lib
from corinfomax_tf.models import projector as projector_lib

Backbone = backbone_lib.CorInfoMaxBackbone


@pytest.mark.parametrize("depth, stem, size, dim, p5", [
    (18, "cifar", 32, 64 * 8 // 8, 4),
    (34, "cifar", 16, 64 * 8 // 8, 2),
    (50, "imagenet", 64, 4 * 64 * 8 // 8, 2),
])
def test_encoder_shapes(depth, stem, size, dim, p5):
  width = 8
  enc = Backbone(depth=depth, stem=stem, width=width)
  x = np.random.rand(2, size, size, 3).astype("float32")
  feature_map = enc(x)
  expected_dim = (4 if depth == 50 else 1) * width * 8
  assert feature_map.shape == (2, p5, p5, expected_dim)
  feats = backbone_lib.pooled_model(enc)(x)
  assert feats.shape == (2, expected_dim) == (2, enc.feature_dim)
  np.testing.assert_allclose(feats, np.mean(feature_map, axis=(1, 2)), rtol=1e-6, atol=1e-7)
  maps = backbone_lib.stage_model(enc)(x)
  assert sorted(maps) == ["P2", "P3", "P4", "P5"]
  assert maps["P5"].shape[1:3] == (p5, p5)
  stride_p2 = 1 if stem == "cifar" else 4
  assert maps["P2"].shape[1] == size // stride_p2
  # keras-hub's convention: level n is 2**n times smaller than the image.
  levels = keras.Model(enc.input, enc.pyramid_outputs)(x)
  for name, tensor in levels.items():
    assert tensor.shape[1] == size // 2**int(name[1:]), name


def test_standard_widths_and_parameter_count():
  # torchvision: resnet18 11.18M (11.69M with the 1000-way fc), resnet50 23.51M
  # without fc. The CIFAR stem replaces the 7x7 conv (9408 weights) by a 3x3 (1728).
  r18 = Backbone(depth=18, stem="imagenet", width=64)
  r50 = Backbone(depth=50, stem="imagenet", width=64)
  assert r18.feature_dim == 512 and r50.feature_dim == 2048
  assert r18.count_params() - _bn_stats(r18) == 11_176_512
  assert r50.count_params() - _bn_stats(r50) == 23_508_032


def _bn_stats(model):
  return sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)


def test_last_batchnorm_of_each_block_starts_at_zero():
  enc = Backbone(depth=18, width=4)
  last = [l for l in enc.layers if l.name.endswith("_bn2")]
  assert len(last) == 8
  for layer in last:
    np.testing.assert_array_equal(layer.gamma.numpy(), 0.0)
  others = [l for l in enc.layers if l.name.endswith("_bn1")]
  assert all(np.all(l.gamma.numpy() == 1.0) for l in others)


def test_encoder_config_round_trip_and_errors():
  enc = Backbone(depth=50, stem="imagenet", width=4, image_size=32)
  clone = Backbone.from_config(enc.get_config())
  assert clone.get_config() == enc.get_config()
  assert len(clone.weights) == len(enc.weights)
  with pytest.raises(ValueError, match="Received: depth=20"):
    Backbone(depth=20)
  with pytest.raises(ValueError, match="Received: stem='tiny'"):
    Backbone(stem="tiny")


def test_the_pooled_model_is_the_earlier_encoder_in_a_checkpoint(tmp_path):
  # Checkpoints written before the encoder became a backbone hold the pooled
  # encoder's layers: the backbone (pretraining, export) and the pooled model
  # (fine-tuning) both read them, every variable consumed.
  import tensorflow as tf
  enc = Backbone(depth=18, width=4, name="encoder")
  for w in enc.weights:
    w.assign(np.random.RandomState(len(w.path)).rand(*w.shape).astype(w.dtype))
  path = tf.train.Checkpoint(encoder=backbone_lib.pooled_model(enc)).write(
      str(tmp_path / "ckpt"))
  for make in (lambda b: b, backbone_lib.pooled_model):
    fresh = Backbone(depth=18, width=4, name="encoder")
    tf.train.Checkpoint(encoder=make(fresh)).read(path).assert_consumed()
    for a, b in zip(enc.weights, fresh.weights):
      np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_projector_layers_normalisation_and_bias():
  proj = projector_lib.Projector(input_dim=16, spec="32-32-8", batch_norm=True)
  out = proj(np.random.rand(4, 16).astype("float32"), training=True)
  assert out.shape == (4, 8)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  denses = [l for l in proj.layers if isinstance(l, keras.layers.Dense)]
  assert [d.units for d in denses] == [32, 32, 8]
  assert denses[-1].bias is None and denses[0].bias is not None
  assert sum(isinstance(l, keras.layers.BatchNormalization) for l in proj.layers) == 2
  clone = projector_lib.Projector.from_config(proj.get_config())
  assert clone.get_config() == proj.get_config()
  raw = projector_lib.Projector(input_dim=16, spec="8", l2_normalize=False)
  assert not np.allclose(np.linalg.norm(raw(np.ones((2, 16), "float32")), axis=1), 1.0)


@pytest.mark.parametrize("spec", ["", "2048-x-64", "2048--64", "0-64", None])
def test_bad_projector_spec(spec):
  with pytest.raises(ValueError, match="Received: projector="):
    projector_lib.parse_projector_spec(spec)
