"""Pure image ops for the two-view augmentation, with explicit arguments and seeds.

Every op takes one float32 image in [0, 1] of shape (H, W, 3) and, where it draws,
a stateless seed (a shape-[2] int tensor), so that the pipeline is reproducible and
parallel maps stay deterministic. They run eagerly and inside tf.data alike (the
tests check both), and each equals the authors' torchvision/PIL op within
interpolation noise (tests/test_fidelity.py).

The composition follows the authors' torchvision pipeline:
random resized crop (bicubic) -> horizontal flip -> colour jitter (random order of
brightness, contrast, saturation, hue) with p -> grayscale with p -> Gaussian blur
with p -> solarisation with p -> per-channel normalisation. `augment_views` draws
every random number of a view first (`view_params`), crops and resizes, then runs the
rest on the fixed-size crops' channel planes in one XLA-compiled call
(`_photometric_planes`).
"""

import functools
import math

import tensorflow as tf

from corinfomax_tf.data.views import ViewConfig  # noqa: F401 (re-exported)

# Gaussian blur kernel radius, fixed so that the op has static shapes: 3 * sigma_max
# covers 99.7% of the mass of the widest kernel (sigma up to 2.0).
_BLUR_RADIUS = 6


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


def random_crop(image, scale, ratio, seed):
  """torchvision's random resized crop region of an image, as float: a uint8 image
  is converted after cropping (the same values, less work)."""
  shape = tf.shape(image)
  top, left, ch, cw = random_resized_crop_box(shape[0], shape[1], scale, ratio, seed)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([ch, cw, 3]))
  return to_float(crop) if crop.dtype != tf.float32 else crop


def random_resized_crop(image, size, scale, ratio, seed):
  """Crop a random region and resize it to (size, size) with bicubic interpolation."""
  crop = random_crop(image, scale, ratio, seed)
  return tf.ensure_shape(resize(crop, (size, size)), (size, size, 3))


def crop_and_flip(image_uint8, size, crop_min_scale, hflip_prob, element_seed, salt):
  """The supervised training view (linear evaluation, fine-tuning): random resized
  crop and horizontal flip of a uint8 image, seeded by (element_seed, salt)."""
  s = tf.unstack(tf.random.experimental.stateless_split(
      tf.stack([element_seed, tf.constant(salt, tf.int64)]), num=2))
  x = random_resized_crop(to_float(image_uint8), size, (crop_min_scale, 1.0),
                          (3 / 4, 4 / 3), s[0])
  return random_flip(x, hflip_prob, s[1])


def _keys_cubic(x):
  """Keys' cubic convolution kernel with a = -0.5 (PIL's and TensorFlow's bicubic)."""
  x = tf.abs(x)
  a = -0.5
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return tf.where(x <= 1.0, near, tf.where(x < 2.0, far, 0.0))


def _resize_rows(x, out_size, blocks=8):
  """(h, w, c) -> (out_size, w, c): PIL's bicubic resampling along axis 0.

  PIL's weights: output row o samples around (o + 0.5) * h / out_size with the Keys
  kernel widened by the shrink factor when shrinking (antialiasing), the weights of
  rows inside the image normalised to sum to one. Computed as products of weight
  matrices and rows: the output rows in `blocks` blocks, each block times the band
  of input rows under its kernels (the full out_size x h product would mostly
  multiply zero weights), the weights of all blocks computed at once. A size known
  only at run time is one block. (One batched product of gathered bands, with 16
  blocks, is faster alone on one thread but 20% slower in the parallel pipeline.)
  """
  h = tf.shape(x)[0]
  flat = tf.reshape(x, [h, -1])
  scale = tf.cast(h, tf.float32) / tf.cast(out_size, tf.float32)
  widen = tf.maximum(scale, 1.0)
  support = 2.0 * widen
  if isinstance(out_size, int):
    step = -(-out_size // blocks)
    count = -(-out_size // step)
  else:
    step, count = out_size, 1
  centers = tf.reshape((tf.cast(tf.range(count * step), tf.float32) + 0.5) * scale,
                       [count, step])
  # Each block's band of rows: from its first kernel's start, long enough for its last.
  band = tf.minimum(tf.cast(tf.math.ceil(tf.cast(step - 1, tf.float32) * scale
                                         + 2.0 * support), tf.int32) + 2, h)
  first = tf.clip_by_value(tf.cast(tf.floor(centers[:, 0] - support), tf.int32), 0, h - band)
  rows = tf.cast(first[:, None] + tf.range(band)[None, :], tf.float32)  # (count, band)
  w = _keys_cubic((rows[:, None, :] + 0.5 - centers[:, :, None])
                  / widen)                                            # (count, step, band)
  w = w / tf.maximum(tf.reduce_sum(w, axis=2, keepdims=True), 1e-12)
  out = tf.concat([tf.matmul(w[b], flat[first[b]:first[b] + band]) for b in range(count)],
                  0)[:out_size]
  return tf.reshape(out, tf.concat([[out_size], tf.shape(x)[1:]], 0))


def _static(v):
  return v if tf.get_static_value(v) is None else int(tf.get_static_value(v))


def _resize_swapped(image, size):
  """(H, W, C) -> (width, height, C), unclipped: `resize` before its last transpose
  (the training views hand this to XLA, which transposes it to planes for free)."""
  height, width = _static(size[0]), _static(size[1])
  y = _resize_rows(image, height)
  return _resize_rows(tf.transpose(y, [1, 0, 2]), width)


def resize(image, size):
  """Bicubic resize of a float (H, W, C) image to `size` (height, width) as PIL does
  it (Keys cubic, a = -0.5, antialiased when shrinking), clipped to [0, 1] as PIL's
  uint8 output is. Equals tf.image.resize(bicubic, antialias=True) to about 1e-6,
  3x faster on a CPU (tf.image's antialiased kernel is the augmentation's slowest op).
  """
  return tf.clip_by_value(tf.transpose(_resize_swapped(image, size), [1, 0, 2]), 0.0, 1.0)


def random_flip(image, prob, seed):
  return tf.cond(_uniform(seed) < prob, lambda: tf.image.flip_left_right(image),
                 lambda: image)


# The photometric ops work on channel planes (3, H, W), each channel contiguous, so
# that XLA's loops run along rows of pixels: with channels last every op strides by
# 3 and the hue round trip ran 3x slower, the blur 2x. The public ops take and give
# (H, W, 3) images and call the planar ones; `_photometric_planes` stays planar
# until its output.

def _planes(image):
  return tf.transpose(image, [2, 0, 1])


def _pixels(planes):
  return tf.transpose(planes, [1, 2, 0])


# ITU-R 601-2 luma weights, as tf.image.rgb_to_grayscale and torchvision use them.
_GRAY = (0.2989, 0.587, 0.114)


def _gray(x):
  return x[0] * _GRAY[0] + x[1] * _GRAY[1] + x[2] * _GRAY[2]


def _grayscale(x):
  return tf.tile(_gray(x)[None], [3, 1, 1])


def _contrast(x, factor):
  # torchvision blends with the mean of the grayscale image.
  return tf.clip_by_value(factor * x + (1.0 - factor) * tf.reduce_mean(_gray(x)),
                          0.0, 1.0)


def _saturation(x, factor):
  return tf.clip_by_value(factor * x + (1.0 - factor) * _gray(x)[None], 0.0, 1.0)


def _hue(x, delta):
  """RGB -> HSV, hue shifted by delta (in turns), -> RGB, as tf.image.adjust_hue
  computes it (to float rounding), in closed form: hue h in [0, 6) sectors; channel
  n (5, 3, 1 for R, G, B) is v - c * clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6,
  where v is the largest channel and c the spread."""
  r, g, b = x[0], x[1], x[2]
  v = tf.maximum(r, tf.maximum(g, b))
  c = v - tf.minimum(r, tf.minimum(g, b))
  safe = tf.where(c > 0.0, c, 1.0)
  h = tf.where(r == v, (g - b) / safe,
               tf.where(g == v, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  h = tf.where(c > 0.0, h, 0.0) + 6.0 * delta
  h = h - 6.0 * tf.floor(h / 6.0)

  def channel(n):
    k = n + h
    k = tf.where(k >= 6.0, k - 6.0, k)
    return v - c * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)
  return tf.clip_by_value(tf.stack([channel(5.0), channel(3.0), channel(1.0)]), 0.0, 1.0)


def grayscale(image):
  return _pixels(_grayscale(_planes(image)))


def adjust_brightness(image, factor):
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  return _pixels(_contrast(_planes(image), factor))


def adjust_saturation(image, factor):
  return _pixels(_saturation(_planes(image), factor))


def adjust_hue(image, delta):
  return _pixels(_hue(_planes(image), delta))


def jitter_params(brightness, contrast, saturation, hue, seed):
  """torchvision ColorJitter's draws: factors uniform in their ranges, random order."""
  s_b, s_c, s_s, s_h, s_order = _split(seed, 5)
  return {"brightness": _uniform(s_b, max(0.0, 1.0 - brightness), 1.0 + brightness),
          "contrast": _uniform(s_c, max(0.0, 1.0 - contrast), 1.0 + contrast),
          "saturation": _uniform(s_s, max(0.0, 1.0 - saturation), 1.0 + saturation),
          "hue": _uniform(s_h, -hue, hue),
          "order": tf.argsort(_uniform(s_order, shape=(4,)))}


def _jitter_in_order(x, p):
  """Brightness, contrast, saturation and hue of planes with drawn factors, in drawn
  order."""
  adjustments = (lambda im: adjust_brightness(im, p["brightness"]),
                 lambda im: _contrast(im, p["contrast"]),
                 lambda im: _saturation(im, p["saturation"]),
                 lambda im: _hue(im, p["hue"]))
  for i in range(4):
    branches = [functools.partial(fn, x) for fn in adjustments]
    x = tf.ensure_shape(tf.switch_case(p["order"][i], branches), x.shape)
  return x


def color_jitter(image, brightness, contrast, saturation, hue, seed):
  """torchvision ColorJitter: factors drawn uniformly, ops applied in random order."""
  params = jitter_params(brightness, contrast, saturation, hue, seed)
  return _pixels(_jitter_in_order(_planes(image), params))


def gaussian_kernel(sigma, radius=_BLUR_RADIUS):
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  return k / tf.reduce_sum(k)


def _blur_axis(x, k, axis):
  """1-D convolution of x with the (2r+1)-tap kernel k along `axis`, edges mirrored
  (tf.pad "SYMMETRIC"): a weighted sum of shifted slices, which XLA fuses into one
  pass."""
  radius = (k.shape[0] - 1) // 2
  rank = len(x.shape)
  pad = [[0, 0]] * rank
  pad[axis] = [radius, radius]
  padded = tf.pad(x, pad, mode="SYMMETRIC")
  n = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
  out = 0.0
  for t in range(2 * radius + 1):
    begin = [0] * rank
    begin[axis] = t
    sizes = [-1] * rank
    sizes[axis] = n
    out += k[t] * tf.slice(padded, begin, sizes)
  return out


def _blur(x, sigma):
  k = gaussian_kernel(sigma)
  return _blur_axis(_blur_axis(x, k, 1), k, 2)


def gaussian_blur(image, sigma):
  """Separable Gaussian blur with edge-symmetric padding (a fixed 13-tap kernel)."""
  return _pixels(_blur(_planes(image), sigma))


def solarize(image, threshold=0.5):
  return tf.where(image >= threshold, 1.0 - image, image)


def normalize(image, mean, std):
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def view_params(view, seed):
  """Every random draw of one view's augmentation, from its seed (a shape-[2] int
  tensor): the crop seed, then a dict of the photometric draws. Drawn in plain
  TensorFlow, never inside XLA, whose stateless generator gives other numbers."""
  seeds = _split(seed, 7)
  s_jit_p, s_jit = _split(seeds[2], 2)
  s_blur_p, s_sigma = _split(seeds[4], 2)
  params = {
      **jitter_params(view.brightness, view.contrast, view.saturation, view.hue, s_jit),
      "flip": _uniform(seeds[1]) < view.hflip_prob,
      "jitter": _uniform(s_jit_p) < view.jitter_prob,
      "grayscale": _uniform(seeds[3]) < view.grayscale_prob,
      "blur": _uniform(s_blur_p) < view.blur_prob,
      "sigma": _uniform(s_sigma, view.blur_sigma[0], view.blur_sigma[1]),
      "solarize": _uniform(seeds[5]) < view.solarize_prob,
  }
  return seeds[0], params


def _when(flag, fn, image, prob):
  # A probability of 0 leaves the op out of the graph; of 1, applies it always.
  if prob <= 0.0:
    return image
  if prob >= 1.0:
    return fn(image)
  return tf.cond(flag, lambda: fn(image), lambda: image)


def _photometric_planes(x, params, view, mean, std):
  """Flip, colour jitter, grayscale, blur, solarisation of a cropped view's channel
  planes with its drawn parameters (`view_params`), then normalisation to (H, W, 3)."""
  x = tf.cond(params["flip"], lambda: tf.reverse(x, [2]), lambda: x)
  x = _when(params["jitter"], lambda im: _jitter_in_order(im, params), x, view.jitter_prob)
  x = _when(params["grayscale"], _grayscale, x, view.grayscale_prob)
  x = _when(params["blur"], lambda im: _blur(im, params["sigma"]), x, view.blur_prob)
  x = _when(params["solarize"], solarize, x, view.solarize_prob)
  return normalize(_pixels(x), mean, std)


def _views_of_swapped(crops, params, views, mean, std):
  # Resized crops as `_resize_swapped` leaves them, (W, H, 3): to clipped planes.
  return tuple(_photometric_planes(tf.clip_by_value(tf.transpose(x, [2, 1, 0]), 0.0, 1.0),
                                   p, v, mean, std)
               for x, p, v in zip(crops, params, views))


@functools.lru_cache(maxsize=None)
def _compiled_views(views, mean, std):
  # One compiled function per set of views and normalisation, taking every view's
  # crop at once (one launch); XLA fuses each view's elementwise chain into a few
  # loops (about 3x faster than op by op on a CPU). Its inputs have a fixed shape
  # (the training size), so it compiles once per size.
  return tf.function(functools.partial(_views_of_swapped, views=views, mean=mean, std=std),
                     jit_compile=True, autograph=False)


def augment_views(image, size, views, mean, std, seeds, compiled=True):
  """Augmented, normalised views of one image (uint8, or float in [0, 1]), one per
  ViewConfig in `views`, each from its seed.

  Each random resized crop is cut from the image as it is (uint8 images are
  converted after cropping, which gives the same values) and resized; the rest
  runs on the (size, size) crops, compiled with XLA unless `compiled=False` (the
  same ops, equal up to float rounding).
  """
  crops, params = [], []
  for view, seed in zip(views, seeds):
    crop_seed, p = view_params(view, seed)
    crop = random_crop(image, view.crop_scale, view.crop_ratio, crop_seed)
    crops.append(tf.ensure_shape(_resize_swapped(crop, (size, size)), (size, size, 3)))
    params.append(p)
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if compiled:
    out = _compiled_views(tuple(views), mean, std)(tuple(crops), tuple(params))
  else:
    out = _views_of_swapped(crops, params, views, mean, std)
  return [tf.ensure_shape(x, (size, size, 3)) for x in out]


def augment_view(image, size, view, mean, std, seed, compiled=True):
  """One augmented, normalised view of an image (see `augment_views`)."""
  return augment_views(image, size, (view,), mean, std, (seed,), compiled)[0]


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
