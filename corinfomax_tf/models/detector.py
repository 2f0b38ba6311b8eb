"""A keras-hub RetinaNet on our encoder's feature maps.

keras-hub names pyramid levels by stride: level l is 2**l times smaller than the
image, and its anchors are sized for that. The encoder (a keras-hub backbone) names its
`pyramid_outputs` so: levels 2..5 with the ImageNet stem, 0..3 with the CIFAR stem.
Defaults: levels 3-7 with the ImageNet stem (COCO's RetinaNet), 2-4 with the CIFAR
stem (small images and objects).

The detector takes float images in [0, 1]; the encoder's training normalisation is
its first layer.
"""

import math

import keras
import keras_hub
import numpy as np

from corinfomax_tf import errors
from corinfomax_tf.models import backbone as backbone_lib

DEFAULT_LEVELS = {"cifar": (2, 4), "imagenet": (3, 7)}
# Anchor side at level l is ANCHOR_SIZE * 2**l. 4 is COCO's RetinaNet; on the generated
# set's small digits (9-15 x 13-21 px) 4 leaves a fifth of the training boxes without
# an anchor of IoU >= 0.5, which the label encoder then never marks positive (and some
# it marks background): 3 covers 99.8% of them with as many anchors.
DEFAULT_ANCHOR_SIZE = {"cifar": 3.0, "imagenet": 4.0}
SCALES, ASPECT_RATIOS = 3, (0.5, 1.0, 2.0)


def levels_for(stem, min_level=0, max_level=0):
  """(min_level, max_level), defaults by stem, checked against the backbone."""
  default_min, default_max = DEFAULT_LEVELS[stem]
  min_level, max_level = min_level or default_min, max_level or default_max
  available = sorted(int(math.log2(s)) for s in backbone_lib.STAGE_STRIDES[stem].values())
  if not available[0] <= min_level <= available[-1]:
    raise errors.ConfigError(f"--min_level={min_level}: the {stem}-stem encoder gives levels "
                        f"{available[0]}..{available[-1]}")
  if max_level < min_level:
    raise errors.ConfigError(f"--max_level={max_level}: must be >= --min_level={min_level}")
  if max_level >= 5 and available[-1] < 5:
    raise errors.ConfigError(f"--max_level={max_level}: keras-hub's pyramid needs backbone "
                        f"level 5 for that; the {stem}-stem encoder ends at "
                        f"{available[-1]} (use --max_level<=4)")
  return min_level, max_level


def check_settings(stem, image_size, min_level=0, max_level=0):
  """(min_level, max_level) for this stem, or one line naming the flag that cannot
  work (checked before any work by the command, again when the detector is built)."""
  min_level, max_level = levels_for(stem, min_level, max_level)
  if image_size % 2**max_level:
    raise errors.ConfigError(f"--image_size={image_size}: must be divisible by "
                             f"2**max_level = {2**max_level}")
  return min_level, max_level


def anchor_generator(stem, min_level, max_level, anchor_size=0.0):
  return keras_hub.layers.AnchorGenerator(
      "xyxy", min_level=min_level, max_level=max_level, num_scales=SCALES,
      aspect_ratios=list(ASPECT_RATIOS),
      anchor_size=anchor_size or DEFAULT_ANCHOR_SIZE[stem])


def anchor_coverage(generator, image_size, boxes, threshold=0.5):
  """Share of `boxes` (N, 4 xyxy) with an anchor of IoU >= threshold: the boxes the
  label encoder can ever mark positive."""
  anchors = np.concatenate([np.asarray(v) for v in generator(
      np.zeros((1, image_size, image_size, 3), np.float32)).values()])
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if not len(boxes):
    return 1.0
  area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
  best = []
  for start in range(0, len(boxes), 64):  # bounded memory on large images
    chunk = boxes[start:start + 64]
    lo = np.maximum(chunk[:, None, :2], anchors[None, :, :2])
    hi = np.minimum(chunk[:, None, 2:], anchors[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    best.append((inter / (area(chunk)[:, None] + area(anchors)[None] - inter)).max(axis=1))
  return float(np.mean(np.concatenate(best) >= threshold))


def build_detector(encoder, metadata, num_classes, *, image_size, min_level=0,
                   max_level=0, anchor_size=0.0, head_convs=2, confidence_threshold=0.05,
                   max_detections=100):
  """RetinaNetObjectDetector on `encoder` (a CorInfoMaxBackbone, shared, trainable),
  behind a normalisation layer: the detector takes images in [0, 1]."""
  stem = metadata["architecture"]["stem"]
  min_level, max_level = check_settings(stem, image_size, min_level, max_level)
  mean = np.asarray(metadata["normalization"]["mean"], np.float32)
  std = np.asarray(metadata["normalization"]["std"], np.float32)
  images = keras.Input((image_size, image_size, 3), name="images")
  normalized = keras.layers.Normalization(mean=mean, variance=std**2,
                                          name="normalize")(images)
  levels = keras.Model(encoder.input, encoder.pyramid_outputs,
                       name=f"{encoder.name}_pyramid")(normalized)
  image_encoder = keras_hub.models.FeaturePyramidBackbone(inputs=images, outputs=levels,
                                                          name="image_encoder")
  image_encoder.pyramid_outputs = levels
  backbone = keras_hub.models.RetinaNetBackbone(
      image_encoder=image_encoder, min_level=min_level, max_level=max_level, use_p5=False,
      image_shape=(image_size, image_size, 3), name="retinanet_backbone")
  anchors = anchor_generator(stem, min_level, max_level, anchor_size)
  decoder = keras_hub.layers.NonMaxSuppression(
      bounding_box_format="xyxy", from_logits=True, iou_threshold=0.5,
      confidence_threshold=confidence_threshold, max_detections=max_detections)
  return keras_hub.models.RetinaNetObjectDetector(
      backbone=backbone, num_classes=num_classes, bounding_box_format="xyxy",
      anchor_generator=anchors, pre_logits_num_conv_layers=head_convs,
      prediction_decoder=decoder, name="retinanet")
