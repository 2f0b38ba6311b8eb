"""ResNet-18/34/50 layers, as the encoder (`backbone.CorInfoMaxBackbone`) builds them.

Matches torchvision's ResNet (the authors' encoder): stride on the 3x3 convolution of
bottleneck blocks (v1.5), 1x1 convolution + BatchNorm projection shortcuts, PyTorch's
symmetric padding for strided convolutions, BatchNorm momentum 0.9 / epsilon 1e-5
(PyTorch's 0.1 / 1e-5), Kaiming-normal (fan_out) convolution weights, and the last
BatchNorm of every residual block starting at gamma = 0 (zero-init residual).

Two stems: "cifar" (3x3 stride-1 convolution, no max-pool) and "imagenet" (7x7
stride-2 convolution, 3x3 stride-2 max-pool). `resnet_body` returns the last feature map
(512 channels for ResNet-18/34 at width 64, 2048 for ResNet-50) and the four stage
outputs; the layer names and their creation order are those of every checkpoint
written so far.
"""

import functools

import keras

from corinfomax_tf.models.fused_batch_norm import FusedBatchNormalization
from corinfomax_tf.models.specs import BLOCKS, STEMS, parse_projector_spec  # noqa: F401

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _conv_init():
  return keras.initializers.VarianceScaling(
      scale=2.0, mode="fan_out", distribution="untruncated_normal")


def _batch_norm(name, synchronized, zero_gamma=False, fused=False):
  layer = FusedBatchNormalization if fused else keras.layers.BatchNormalization
  return layer(
      momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, synchronized=synchronized,
      gamma_initializer="zeros" if zero_gamma else "ones", name=name)


def _conv(x, filters, kernel_size, stride, name):
  """Convolution with PyTorch's padding (kernel_size // 2 on every side)."""
  pad = kernel_size // 2
  if stride > 1 and pad > 0:
    x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
    padding = "valid"
  else:
    padding = "same"
  return keras.layers.Conv2D(filters, kernel_size, strides=stride, padding=padding,
                             use_bias=False, kernel_initializer=_conv_init(),
                             name=name)(x)


def _basic_block(x, filters, stride, name, norm):
  shortcut = x
  y = _conv(x, filters, 3, stride, f"{name}_conv1")
  y = norm(f"{name}_bn1")(y)
  y = keras.layers.ReLU(name=f"{name}_relu1")(y)
  y = _conv(y, filters, 3, 1, f"{name}_conv2")
  y = norm(f"{name}_bn2", zero_gamma=True)(y)
  if stride != 1 or x.shape[-1] != filters:
    shortcut = _conv(x, filters, 1, stride, f"{name}_down_conv")
    shortcut = norm(f"{name}_down_bn")(shortcut)
  y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
  return keras.layers.ReLU(name=f"{name}_out")(y)


def _bottleneck_block(x, filters, stride, name, norm):
  out_filters = 4 * filters
  shortcut = x
  y = _conv(x, filters, 1, 1, f"{name}_conv1")
  y = norm(f"{name}_bn1")(y)
  y = keras.layers.ReLU(name=f"{name}_relu1")(y)
  y = _conv(y, filters, 3, stride, f"{name}_conv2")
  y = norm(f"{name}_bn2")(y)
  y = keras.layers.ReLU(name=f"{name}_relu2")(y)
  y = _conv(y, out_filters, 1, 1, f"{name}_conv3")
  y = norm(f"{name}_bn3", zero_gamma=True)(y)
  if stride != 1 or x.shape[-1] != out_filters:
    shortcut = _conv(x, out_filters, 1, stride, f"{name}_down_conv")
    shortcut = norm(f"{name}_down_bn")(shortcut)
  y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
  return keras.layers.ReLU(name=f"{name}_out")(y)


def check_architecture(depth, stem, width, image_size):
  """keras-hub style argument errors ("... Received: x=...")."""
  if depth not in BLOCKS:
    raise ValueError(f"depth must be one of {sorted(BLOCKS)}. Received: depth={depth!r}")
  if stem not in STEMS:
    raise ValueError(f"stem must be one of {STEMS}. Received: stem={stem!r}")
  if not isinstance(width, int) or width < 1:
    raise ValueError(f"width must be a positive integer. Received: width={width!r}")
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise ValueError("image_size must be a positive integer or None. "
                     f"Received: image_size={image_size!r}")


def resnet_body(inputs, depth, stem, width, sync_batch_norm, fused_batch_norm=False):
  """(last feature map, {"P2": ..., "P5": ...}) of the ResNet on `inputs`: the layers,
  their names and their creation order are the encoder's (checkpoints depend on it).
  `fused_batch_norm`: `FusedBatchNormalization` layers (the same weights and names)."""
  norm = functools.partial(_batch_norm, synchronized=sync_batch_norm,
                           fused=fused_batch_norm)
  if stem == "cifar":
    x = _conv(inputs, width, 3, 1, "stem_conv")
    x = norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
  else:
    x = _conv(inputs, width, 7, 2, "stem_conv")
    x = norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
  kind, counts = BLOCKS[depth]
  block_fn = _basic_block if kind == "basic" else _bottleneck_block
  pyramid = {}
  for stage, count in enumerate(counts):
    filters = width * 2**stage
    for index in range(count):
      stride = 2 if (stage > 0 and index == 0) else 1
      x = block_fn(x, filters, stride, f"stage{stage + 1}_block{index + 1}", norm)
    pyramid[f"P{stage + 2}"] = x
  return x, pyramid
