"""The encoder: a keras-hub backbone, what Keras users load from a preset.

    import corinfomax_tf.models.backbone  # registers the class with Keras
    backbone = keras_hub.models.Backbone.from_preset("runs/digits/export/preset")
    classifier = keras_hub.models.ImageClassifier(backbone=backbone, num_classes=10)

Like every keras-hub image backbone, it ends with the last feature map and whoever
needs pooled features pools (`pooled_model`, the pretraining model, the probes, the
SavedModel's signatures, keras-hub's tasks). `pyramid_outputs` follows keras-hub's
convention, level n being 2**n times smaller than the image: P2..P5 with the ImageNet
stem, P0..P3 with the CIFAR stem (no stride in the stem), so keras-hub's RetinaNet
takes it as it is. `stage_outputs` names the four stage outputs P2..P5 by stage (the
SavedModel's `feature_maps` signature).

It takes normalised images: a preset's metadata holds the training mean and standard
deviation (the SavedModel export normalises inside). Its layers, their names and
their order are those of every checkpoint written so far (`resnet.resnet_body`).
The network is plain Keras: it runs on the TensorFlow, JAX and PyTorch backends.
"""

import keras
from keras_hub.models import FeaturePyramidBackbone

from corinfomax_tf.models import pooling, resnet

# The stride of each stage output, by stem.
STAGE_STRIDES = {"cifar": {"P2": 1, "P3": 2, "P4": 4, "P5": 8},
                 "imagenet": {"P2": 4, "P3": 8, "P4": 16, "P5": 32}}


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class CorInfoMaxBackbone(FeaturePyramidBackbone):
  """ResNet-18/34/50 (torchvision's layout, CIFAR or ImageNet stem) as a keras-hub
  `FeaturePyramidBackbone`: normalised images in, the last feature map out.

  Args:
    depth: 18, 34 or 50.
    stem: "cifar" (3x3 stride-1 convolution, no max-pool) or "imagenet".
    width: filters of the first stage (64: the standard ResNet; smaller values make
      the tiny models of the embedded default and the tests).
    image_size: height/width of the input, or None for any size.
    sync_batch_norm: synchronise BatchNorm statistics across replicas.
    fused_batch_norm: `FusedBatchNormalization` layers: TensorFlow's fused kernel in
      training mode, a faster step that is not bitwise the default one.
    dtype: the dtype policy of the layers (keras-hub's convention).

  Returns (when called):
    The last feature map, [B, H', W', C] (C = 8 * width for ResNet-18/34, 32 * width
    for ResNet-50); `pyramid_outputs` holds every stage's, named by stride.

  Example:

  ```python
  backbone = corinfomax_tf.CorInfoMaxBackbone(depth=18, stem="cifar", width=64)
  model = corinfomax_tf.CorInfoMax(backbone, projector="2048-2048-64")
  # Or keras-hub's tasks on it:
  classifier = keras_hub.models.ImageClassifier(backbone=backbone, num_classes=10)
  ```
  """

  def __init__(self, depth=18, stem="cifar", width=64, image_size=None,
               sync_batch_norm=False, fused_batch_norm=False, dtype=None, **kwargs):
    resnet.check_architecture(depth, stem, width, image_size)

    # === Functional model ===
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    x, stages = resnet.resnet_body(inputs, depth, stem, width, sync_batch_norm,
                                   fused_batch_norm)
    super().__init__(inputs=inputs, outputs=x, dtype=dtype, **kwargs)

    # === Config ===
    self.depth = depth
    self.stem = stem
    self.width = width
    self.image_size = image_size
    self.sync_batch_norm = sync_batch_norm
    self.fused_batch_norm = fused_batch_norm
    self.stage_outputs = stages
    self.pyramid_outputs = {
        f"P{STAGE_STRIDES[stem][name].bit_length() - 1}": tensor
        for name, tensor in stages.items()}
    self.feature_dim = int(x.shape[-1])

  def get_config(self):
    config = super().get_config()
    config.update({"depth": self.depth, "stem": self.stem, "width": self.width,
                   "image_size": self.image_size,
                   "sync_batch_norm": self.sync_batch_norm,
                   "fused_batch_norm": self.fused_batch_norm})
    return config


def pooled_model(backbone, name=None):
  """A model sharing the backbone's layers that returns globally average-pooled
  features (`pooling.pooled_model`, which takes any backbone)."""
  return pooling.pooled_model(backbone, name=name)


def stage_model(backbone):
  """A model sharing the backbone's layers that returns {"P2": ..., "P5": ...} by
  stage (the SavedModel's `feature_maps`)."""
  return keras.Model(backbone.input, backbone.stage_outputs,
                     name=f"{backbone.name}_stages")
