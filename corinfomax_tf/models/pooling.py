"""From any backbone's output to one feature vector per image.

    pooled = pooling.pooled_model(backbone)     # keras.Model: images -> [B, F]

A backbone may end with
  * a feature map [B, H, W, C] (ResNets, EfficientNet, MobileNet, ConvNeXt, Swin,
    every keras-hub `FeaturePyramidBackbone`): global average pooling;
  * a token sequence [B, T, C] (ViT, DeiT, DINOv2/v3): the class token (position 0)
    where the backbone has one, else the mean over tokens;
  * a vector [B, C]: taken as it is.
The feature dimension is read from the model (`feature_dim`).
"""

import keras
from keras import ops

FEATURE_MAP, TOKENS, VECTOR = "feature_map", "tokens", "vector"
# keras-hub backbones whose token 0 is a class token, besides those with a
# `use_class_token` attribute (ViTBackbone).
CLASS_TOKEN_BACKBONES = ("DINOV2Backbone", "DINOV3Backbone", "DeiTBackbone")


def output_kind(backbone):
  """"feature_map", "tokens" or "vector"; ValueError for any other output."""
  output = backbone.output
  if isinstance(output, (dict, list, tuple)):
    raise ValueError("The backbone must have one output (a feature map, a token sequence "
                     f"or a vector). Received: outputs={output!r}")
  rank = len(output.shape)
  kinds = {4: FEATURE_MAP, 3: TOKENS, 2: VECTOR}
  if rank not in kinds:
    raise ValueError("The backbone's output must be a feature map [B, H, W, C], a token "
                     f"sequence [B, T, C] or a vector [B, C]. Received: output shape "
                     f"{tuple(output.shape)}")
  return kinds[rank]


def has_class_token(backbone):
  """Whether token 0 of the backbone's output sequence is a class token."""
  flag = getattr(backbone, "use_class_token", None)
  if flag is not None:
    return bool(flag)
  return type(backbone).__name__ in CLASS_TOKEN_BACKBONES


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class TokenPooling(keras.layers.Layer):
  """[B, T, C] tokens -> [B, C]: token 0 (`class_token=True`) or the mean of all."""

  def __init__(self, class_token=True, **kwargs):
    super().__init__(**kwargs)
    self.class_token = class_token

  def call(self, tokens):
    return tokens[:, 0] if self.class_token else ops.mean(tokens, axis=1)

  def compute_output_shape(self, input_shape):
    return (input_shape[0], input_shape[-1])

  def get_config(self):
    return {**super().get_config(), "class_token": self.class_token}


def pooling_layer(backbone):
  """The layer that turns the backbone's output into [B, F] (None for a vector)."""
  kind = output_kind(backbone)
  if kind == FEATURE_MAP:
    # The name of every checkpoint and export written so far.
    return keras.layers.GlobalAveragePooling2D(name="avg_pool")
  if kind == TOKENS:
    return TokenPooling(class_token=has_class_token(backbone), name="token_pool")
  return None


def describe(backbone):
  """How features are taken, in words (export metadata, logs)."""
  kind = output_kind(backbone)
  if kind == FEATURE_MAP:
    return "feature map, average-pooled"
  if kind == TOKENS:
    return "tokens, class token" if has_class_token(backbone) else "tokens, mean"
  return "vector"


def feature_dim(backbone):
  return int(backbone.output.shape[-1])


def pooled_model(backbone, name=None):
  """A model sharing the backbone's layers that returns [B, F] pooled features.

  A feature map is average-pooled, a token sequence gives its class token (or the
  token mean where there is none), a vector is taken as it is.

  Args:
    backbone: a keras.Model (functional) whose output is a feature map, a token
      sequence or a vector.
    name: the model's name (default: the backbone's).

  Returns:
    A keras.Model on the backbone's input, with `feature_dim` (F) set.

  Example:

  ```python
  encoder = corinfomax_tf.pooled_model(keras_hub.models.Backbone.from_preset(path))
  features = encoder(normalised_images)   # [B, F]
  ```
  """
  layer = pooling_layer(backbone)
  output = backbone.output if layer is None else layer(backbone.output)
  model = keras.Model(backbone.input, output, name=name or backbone.name)
  model.feature_dim = feature_dim(backbone)
  return model


def pool(backbone, outputs):
  """Pooled features of outputs already computed by `backbone` (numpy or tensors)."""
  kind = output_kind(backbone)
  if kind == FEATURE_MAP:
    return ops.mean(outputs, axis=(1, 2))
  if kind == TOKENS:
    return outputs[:, 0] if has_class_token(backbone) else ops.mean(outputs, axis=1)
  return outputs
