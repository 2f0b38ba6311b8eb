"""What the model flags may say, as plain Python (no TensorFlow): the ResNet names,
depths and stems, the projector's spec string, a backbone config file's JSON. The
command line checks flags with these before TensorFlow starts."""

import json

from corinfomax_tf import errors

# --backbone values that name our ResNets (by depth; "resnet" takes --depth).
RESNETS = {"resnet": None, "resnet18": 18, "resnet34": 34, "resnet50": 50}

# ResNet depth -> (block kind, blocks per stage), as torchvision's.
BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
STEMS = ("cifar", "imagenet")


def parse_projector_spec(spec):
  """"2048-2048-64" -> (2048, 2048, 64); raises ValueError naming the spec."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError("projector must be a string of layer widths such as "
                     f"'2048-2048-64'. Received: projector={spec!r}")
  try:
    widths = tuple(int(part) for part in spec.strip().split("-"))
  except ValueError:
    raise ValueError("projector must be positive integers joined by '-', such as "
                     f"'2048-2048-64'. Received: projector={spec!r}") from None
  if any(w < 1 for w in widths):
    raise ValueError("projector widths must be positive. "
                     f"Received: projector={spec!r}")
  return widths


def is_resnet(name):
  return name in RESNETS


def read_backbone_config(path, flag="--backbone_config"):
  """The serialized backbone config of a JSON file, checked enough to name the file."""
  try:
    with open(path) as fh:
      config = json.load(fh)
  except OSError as e:
    raise errors.ConfigError(f"{flag}={path}: cannot be read ({e.strerror})") from None
  except ValueError as e:
    raise errors.ConfigError(f"{flag}={path}: not JSON ({e})") from None
  if not isinstance(config, dict) or "class_name" not in config:
    raise errors.ConfigError(
        f"{flag}={path}: not a serialized Keras object (expected the JSON that "
        "keras.saving.serialize_keras_object writes, with a 'class_name')")
  return config
