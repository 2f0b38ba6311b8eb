"""Pure image ops for the two-view augmentation, with explicit arguments and seeds.

Every op takes one float32 image in [0, 1] of shape (H, W, 3) and a stateless seed
(a shape-[2] int tensor), so that the pipeline is reproducible and parallel maps
stay deterministic. They run eagerly and inside tf.data alike (the tests check both).

The composition follows the authors' torchvision pipeline:
random resized crop (bicubic) -> horizontal flip -> colour jitter (random order of
brightness, contrast, saturation, hue) with p -> grayscale with p -> Gaussian blur
with p -> solarisation with p -> per-channel normalisation.
"""

import dataclasses
import functools
import math

import tensorflow as tf

# Gaussian blur kernel radius, fixed so that the op has static shapes: 3 * sigma_max
# covers 99.7% of the mass of the widest kernel (sigma up to 2.0).
_BLUR_RADIUS = 6


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Probabilities and strengths of one view's augmentation."""
  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
  hflip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_prob: float = 1.0
  blur_sigma: tuple = (0.1, 2.0)
  solarize_prob: float = 0.0


def _split(seed, num):
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _uniform(seed, low=0.0, high=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def random_resized_crop_box(height, width, scale, ratio, seed, attempts=10):
  """torchvision's RandomResizedCrop.get_params, vectorised over its 10 attempts.

  Returns (top, left, crop_height, crop_width) as int32 scalars.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area = h * w
  s_area, s_ratio, s_top, s_left = _split(seed, 4)
  target = area * _uniform(s_area, scale[0], scale[1], (attempts,))
  log_ratio = _uniform(s_ratio, math.log(ratio[0]), math.log(ratio[1]), (attempts,))
  aspect = tf.exp(log_ratio)
  cw = tf.round(tf.sqrt(target * aspect))
  ch = tf.round(tf.sqrt(target / aspect))
  ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  # Fallback (no attempt fits): central crop with the ratio clamped to the range.
  in_ratio = w / h
  fb_w = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1],
                                                  tf.round(h * ratio[1]), w))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]),
                  tf.where(in_ratio > ratio[1], h, h))
  first = tf.argmax(tf.cast(ok, tf.int32))
  any_ok = tf.reduce_any(ok)
  crop_h = tf.where(any_ok, ch[first], fb_h)
  crop_w = tf.where(any_ok, cw[first], fb_w)
  top = tf.where(any_ok, tf.floor(_uniform(s_top) * (h - crop_h + 1)),
                 tf.floor((h - crop_h) / 2))
  left = tf.where(any_ok, tf.floor(_uniform(s_left) * (w - crop_w + 1)),
                  tf.floor((w - crop_w) / 2))
  # A uniform draw of exactly 1.0 cannot happen, but clamp for safety.
  top = tf.minimum(top, h - crop_h)
  left = tf.minimum(left, w - crop_w)
  return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))


def random_resized_crop(image, size, scale, ratio, seed):
  """Crop a random region and resize it to (size, size) with bicubic interpolation."""
  shape = tf.shape(image)
  top, left, ch, cw = random_resized_crop_box(shape[0], shape[1], scale, ratio, seed)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([ch, cw, 3]))
  return resize(crop, (size, size))


def crop_and_flip(image_uint8, size, crop_min_scale, hflip_prob, element_seed, salt):
  """The supervised training view (linear evaluation, fine-tuning): random resized
  crop and horizontal flip of a uint8 image, seeded by (element_seed, salt)."""
  s = tf.unstack(tf.random.experimental.stateless_split(
      tf.stack([element_seed, tf.constant(salt, tf.int64)]), num=2))
  x = random_resized_crop(to_float(image_uint8), size, (crop_min_scale, 1.0),
                          (3 / 4, 4 / 3), s[0])
  return random_flip(x, hflip_prob, s[1])


def resize(image, size):
  # Bicubic overshoots; clip back to [0, 1] as PIL's uint8 output does.
  out = tf.image.resize(image, size, method="bicubic", antialias=True)
  return tf.clip_by_value(out, 0.0, 1.0)


def random_flip(image, prob, seed):
  return tf.cond(_uniform(seed) < prob, lambda: tf.image.flip_left_right(image),
                 lambda: image)


def grayscale(image):
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def adjust_brightness(image, factor):
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  # torchvision blends with the mean of the grayscale image.
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  gray = tf.image.rgb_to_grayscale(image)
  return tf.clip_by_value(factor * image + (1.0 - factor) * gray, 0.0, 1.0)


def adjust_hue(image, delta):
  return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image, brightness, contrast, saturation, hue, seed):
  """torchvision ColorJitter: factors drawn uniformly, ops applied in random order."""
  s_b, s_c, s_s, s_h, s_order = _split(seed, 5)
  b = _uniform(s_b, max(0.0, 1.0 - brightness), 1.0 + brightness)
  c = _uniform(s_c, max(0.0, 1.0 - contrast), 1.0 + contrast)
  s = _uniform(s_s, max(0.0, 1.0 - saturation), 1.0 + saturation)
  h = _uniform(s_h, -hue, hue)
  order = tf.argsort(_uniform(s_order, shape=(4,)))
  adjustments = (lambda im: adjust_brightness(im, b),
                 lambda im: adjust_contrast(im, c),
                 lambda im: adjust_saturation(im, s),
                 lambda im: adjust_hue(im, h))
  for i in range(4):
    branches = [functools.partial(fn, image) for fn in adjustments]
    image = tf.ensure_shape(tf.switch_case(order[i], branches), image.shape)
  return image


def gaussian_kernel(sigma, radius=_BLUR_RADIUS):
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  return k / tf.reduce_sum(k)


def gaussian_blur(image, sigma):
  """Separable Gaussian blur with edge-symmetric padding (a fixed 13-tap kernel)."""
  k = gaussian_kernel(sigma)
  radius = _BLUR_RADIUS
  x = image[tf.newaxis]
  x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
  kh = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
  kw = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
  x = tf.nn.depthwise_conv2d(x, kh, [1, 1, 1, 1], "VALID")
  x = tf.nn.depthwise_conv2d(x, kw, [1, 1, 1, 1], "VALID")
  return x[0]


def solarize(image, threshold=0.5):
  return tf.where(image >= threshold, 1.0 - image, image)


def _maybe(prob, seed, fn, image):
  if prob <= 0.0:
    return image
  if prob >= 1.0:
    return fn(image)
  return tf.cond(_uniform(seed) < prob, lambda: fn(image), lambda: image)


def normalize(image, mean, std):
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def augment_view(image, size, view, mean, std, seed):
  """One augmented, normalised view of a float image in [0, 1]."""
  seeds = _split(seed, 7)
  x = random_resized_crop(image, size, view.crop_scale, view.crop_ratio, seeds[0])
  x = random_flip(x, view.hflip_prob, seeds[1])
  s_jit_p, s_jit = _split(seeds[2], 2)
  x = _maybe(view.jitter_prob, s_jit_p,
             lambda im: color_jitter(im, view.brightness, view.contrast,
                                     view.saturation, view.hue, s_jit), x)
  x = _maybe(view.grayscale_prob, seeds[3], grayscale, x)
  s_blur_p, s_sigma = _split(seeds[4], 2)
  sigma = _uniform(s_sigma, view.blur_sigma[0], view.blur_sigma[1])
  x = _maybe(view.blur_prob, s_blur_p, lambda im: gaussian_blur(im, sigma), x)
  x = _maybe(view.solarize_prob, seeds[5], solarize, x)
  x = tf.ensure_shape(x, (size, size, 3))
  return normalize(x, mean, std)


def eval_size(size):
  """The shorter side an evaluation image is resized to: int(size * 8 / 7), as the
  reference truncates it (32 -> 36, 64 -> 73, 224 -> 256)."""
  return int(size * 8 / 7)


def eval_view(image, size, mean, std):
  """The reference's test-time transform (torchvision Resize(int(size * 8 / 7)),
  bicubic, then CenterCrop(size)), at every input size, the training size included.

  As torchvision computes them: the longer side becomes int(target * long / short)
  (truncated), and the crop's offsets round((resized - size) / 2), half to even.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  target = eval_size(size)
  short = tf.cast(tf.minimum(h, w), tf.float64)

  def scaled(side):
    # Exact for image sizes: the integer product first, as Python's int(a * b / c).
    return tf.cast(tf.floor(tf.cast(side * target, tf.float64) / short), tf.int32)

  nh = tf.where(h <= w, target, scaled(h))
  nw = tf.where(w <= h, target, scaled(w))
  resized = resize(image, tf.stack([nh, nw]))
  # tf.round rounds half to even, as Python's round in torchvision's CenterCrop.
  top = tf.cast(tf.round(tf.cast(nh - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(nw - size, tf.float32) / 2.0), tf.int32)
  x = tf.slice(resized, tf.stack([top, left, 0]), [size, size, 3])
  return normalize(tf.ensure_shape(x, (size, size, 3)), mean, std)


def to_float(image_uint8):
  """uint8 (H, W, C) with C in {1, 3} -> float32 RGB in [0, 1]."""
  x = tf.image.convert_image_dtype(image_uint8, tf.float32)
  if x.shape[-1] == 1:
    x = tf.tile(x, [1, 1, 3])
  return x
