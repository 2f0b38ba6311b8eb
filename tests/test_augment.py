"""Augmentation ops: ranges, shapes, seeds, eager == inside tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf.data import augment

VIEW = augment.ViewConfig(blur_prob=0.5, solarize_prob=0.5)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def image(h=20, w=28, seed=0):
  return tf.constant(np.random.RandomState(seed).rand(h, w, 3).astype(np.float32))


@pytest.mark.parametrize("h, w", [(32, 32), (20, 28), (100, 9), (9, 100)])
def test_crop_box_lies_inside_the_image(h, w):
  for s in range(50):
    top, left, ch, cw = [int(v) for v in augment.random_resized_crop_box(
        h, w, (0.08, 1.0), (3 / 4, 4 / 3), tf.constant([s, 1]))]
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert ch >= 1 and cw >= 1


def test_crop_area_follows_the_scale_range():
  areas = []
  for s in range(200):
    _, _, ch, cw = augment.random_resized_crop_box(64, 64, (0.5, 1.0), (1.0, 1.0),
                                                   tf.constant([s, 2]))
    areas.append(int(ch) * int(cw) / 64 ** 2)
  assert 0.45 <= min(areas) and max(areas) <= 1.0 and np.mean(areas) > 0.65


def test_augment_view_shape_range_and_seed_determinism():
  x = image()
  a = augment.augment_view(x, 16, VIEW, MEAN, STD, tf.constant([3, 4]))
  b = augment.augment_view(x, 16, VIEW, MEAN, STD, tf.constant([3, 4]))
  c = augment.augment_view(x, 16, VIEW, MEAN, STD, tf.constant([5, 4]))
  assert a.shape == (16, 16, 3)
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.allclose(a.numpy(), c.numpy())
  raw = a.numpy() * 0.25 + 0.5  # undo the normalisation
  assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6


def test_eager_equals_tf_data():
  x = image()
  seeds = [tf.constant([i, 7], tf.int64) for i in range(6)]
  eager = [augment.augment_view(x, 12, VIEW, MEAN, STD, s).numpy() for s in seeds]
  ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
      lambda s: augment.augment_view(x, 12, VIEW, MEAN, STD, s))
  for got, want in zip(ds, eager):
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_photometric_ops():
  x = image()
  np.testing.assert_allclose(augment.solarize(tf.constant([0.2, 0.5, 0.9])).numpy(),
                             [0.2, 0.5, 0.1], atol=1e-7)
  g = augment.grayscale(x).numpy()
  np.testing.assert_allclose(g[..., 0], g[..., 2])
  flat = tf.fill((10, 10, 3), 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(flat, 1.5).numpy(), 0.3, atol=1e-6)
  blurred = augment.gaussian_blur(x, 2.0).numpy()
  assert blurred.std() < x.numpy().std()
  np.testing.assert_allclose(augment.adjust_saturation(x, 0.0).numpy(),
                             augment.grayscale(x).numpy(), atol=1e-6)
  assert augment.color_jitter(x, 0.4, 0.4, 0.2, 0.1, tf.constant([1, 1])).shape == x.shape


def test_flip_probability_extremes():
  x = image()
  np.testing.assert_array_equal(augment.random_flip(x, 1.0, tf.constant([0, 0])),
                                x.numpy()[:, ::-1])
  np.testing.assert_array_equal(augment.random_flip(x, 0.0, tf.constant([0, 0])), x)


def test_eval_view_resizes_and_centre_crops_at_every_size():
  out = augment.eval_view(image(40, 60), 16, MEAN, STD)
  assert out.shape == (16, 16, 3)
  # An image of the training size is enlarged to 18 and its centre kept, as the
  # reference does (tests/test_fidelity.py compares the values with torchvision).
  same = image(16, 16)
  got = augment.eval_view(same, 16, MEAN, STD).numpy()
  assert got.shape == (16, 16, 3)
  assert not np.allclose(got, (same.numpy() - 0.5) / 0.25, atol=1e-3)


@pytest.mark.parametrize("h, w, size", [(316, 316, 224), (150, 200, 224), (375, 500, 224),
                                        (16, 16, 16), (9, 13, 12), (480, 120, 64)])
def test_resize_equals_tensorflows_antialiased_bicubic(h, w, size):
  """The blocked product gives tf.image.resize(bicubic, antialias=True), which the
  fidelity tests compare with PIL; with a size known at run time (one block) too."""
  x = image(h, w)
  want = tf.clip_by_value(tf.image.resize(x, (size, size), "bicubic", antialias=True), 0, 1)
  np.testing.assert_allclose(augment.resize(x, (size, size)).numpy(), want, atol=5e-5)
  dynamic = tf.function(lambda im, n: augment.resize(im, tf.stack([n, n])))
  np.testing.assert_allclose(dynamic(x, tf.constant(size)).numpy(), want, atol=5e-5)


def test_compiled_view_equals_the_same_ops_uncompiled_and_uint8_equals_float():
  x8 = tf.constant(np.random.RandomState(3).randint(0, 256, (40, 52, 3)).astype(np.uint8))
  for s in range(8):
    seed = tf.constant([s, 9])
    compiled = augment.augment_view(x8, 24, VIEW, MEAN, STD, seed).numpy()
    plain = augment.augment_view(x8, 24, VIEW, MEAN, STD, seed, compiled=False).numpy()
    from_float = augment.augment_view(augment.to_float(x8), 24, VIEW, MEAN, STD, seed,
                                      compiled=False).numpy()
    np.testing.assert_allclose(compiled, plain, atol=2e-5)
    np.testing.assert_array_equal(plain, from_float)


def test_closed_form_hue_equals_tensorflows_hsv_round_trip():
  """The planar hue shift against tf.image.adjust_hue, on random pixels, grays,
  pure and two-channel colours (every hue sector and its edges), eager and XLA."""
  rs = np.random.RandomState(5)
  edge = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],
                   [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [0.2, 0.2, 0.9]], np.float32)
  pixels = np.concatenate([rs.rand(246, 3).astype(np.float32), edge]).reshape(16, 16, 3)
  x = tf.constant(pixels)
  compiled = tf.function(augment.adjust_hue, jit_compile=True)
  for delta in (-0.5, -0.1, -1e-3, 0.0, 0.05, 0.3, 0.5):
    want = tf.clip_by_value(tf.image.adjust_hue(x, delta), 0.0, 1.0).numpy()
    np.testing.assert_allclose(augment.adjust_hue(x, delta).numpy(), want, atol=2e-6)
    np.testing.assert_allclose(compiled(x, tf.constant(delta)).numpy(), want, atol=2e-6)


def test_planar_blur_equals_a_direct_separable_convolution():
  """The blur on channel planes against numpy: edge-symmetric padding, 13 taps."""
  x = image(23, 31).numpy()
  for sigma in (0.1, 0.7, 2.0):
    k = augment.gaussian_kernel(sigma).numpy().astype(np.float64)
    r = (len(k) - 1) // 2
    p = np.pad(x.astype(np.float64), [(r, r), (r, r), (0, 0)], mode="symmetric")
    rows = sum(k[t] * p[t:t + 23] for t in range(2 * r + 1))
    want = sum(k[t] * rows[:, t:t + 31] for t in range(2 * r + 1))
    np.testing.assert_allclose(augment.gaussian_blur(tf.constant(x), sigma).numpy(), want,
                               atol=1e-6)
