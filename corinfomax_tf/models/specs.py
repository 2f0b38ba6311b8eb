"""What the model flags may say, as plain Python (no TensorFlow): the ResNet depths
and stems, and the projector's spec string. The command line checks flags with these
before TensorFlow starts."""

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
