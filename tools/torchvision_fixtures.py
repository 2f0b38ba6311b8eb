r"""Reference outputs of the authors' image ops (torchvision on PIL images), for the tests.

Run in a separate environment that has torch and torchvision (never the project's):

    python -m venv /tmp/tv
    /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow==13.0.0 numpy \
        scikit-learn==1.9.1
    /tmp/tv/bin/python tools/torchvision_fixtures.py tests/fixtures/torchvision_ops.npz

It writes one compressed .npz: fixed uint8 inputs (cut from scikit-learn's two sample
photos, decoded by PIL here and stored, so the tests need neither the JPEGs nor
torch), and what the authors' pipeline makes of them, op by op, with fixed
parameters, as uint8 (torchvision works on PIL images and converts to a tensor only at
the end). tests/test_fidelity.py compares the project's TensorFlow ops with them.

What the authors' code applies (see shared/reference/corinfomax-reference.md):
RandomResizedCrop (bicubic), RandomHorizontalFlip, ColorJitter (brightness, contrast,
saturation, hue), RandomGrayscale, a PIL GaussianBlur with sigma ~ U(0.1, 2.0), PIL's
solarize, and at test time Resize(int(size * 8 / 7), bicubic) + CenterCrop(size).
"""

import argparse
import os

import numpy as np
import sklearn.datasets
import torch
import torchvision
from PIL import Image
from PIL import ImageFilter
from PIL import ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as F

BICUBIC = InterpolationMode.BICUBIC
# Shapes whose RandomResizedCrop parameters are sampled: CIFAR, Tiny ImageNet, an
# ImageNet photo, and a sliver that forces the fallback central crop.
CROP_SHAPES = ((32, 32), (64, 64), (375, 500), (100, 9))
CROP_SAMPLES = 3000


def photo(name, box, size):
  """A region (left, top, right, bottom) of a scikit-learn sample photo, resized."""
  path = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name)
  with Image.open(path) as im:
    return im.convert("RGB").crop(box).resize(size, Image.LANCZOS)


def arr(image):
  return np.asarray(image, dtype=np.uint8)


def inputs():
  return {
      "img32": photo("china.jpg", (150, 100, 350, 300), (32, 32)),
      "img64": photo("flower.jpg", (120, 40, 520, 440), (64, 64)),
      # (height, width) = (36, 39): at 32 px the centre crop's left offset is
      # round(3.5) = 4 (half to even), where floor division would give 3.
      "img36x39": photo("flower.jpg", (0, 0, 390, 360), (39, 36)),
      # A portrait image (90 x 70): the width is the shorter side.
      "portrait": photo("china.jpg", (300, 0, 580, 360), (70, 90)),
      # An ImageNet-like photo (288 x 384), shrunk at 224 px (288 -> 256).
      "photo": photo("china.jpg", (0, 0, 569, 427), (384, 288)),
  }


def eval_transform(image, size):
  resized = F.resize(image, int(size * 8 / 7), interpolation=BICUBIC)
  return F.center_crop(resized, size)


def crop_statistics(seed=0):
  """RandomResizedCrop.get_params draws: (top, left, height, width) per shape."""
  torch.manual_seed(seed)
  out = {}
  for h, w in CROP_SHAPES:
    image = Image.new("RGB", (w, h))
    draws = [RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
             for _ in range(CROP_SAMPLES)]
    out[f"crop_params_{h}x{w}"] = np.asarray(draws, dtype=np.int16)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("output")
  args = parser.parse_args()
  images = inputs()
  out = {f"input_{k}": arr(v) for k, v in images.items()}
  out["versions"] = np.asarray([f"torch {torch.__version__}",
                                f"torchvision {torchvision.__version__}",
                                f"pillow {Image.__version__}"])

  # Test-time transform at 32, 64 and 224 px, and the two rounding cases.
  for key, name, size in (("eval32", "img32", 32), ("eval64", "img64", 64),
                          ("eval224", "photo", 224), ("eval32_36x39", "img36x39", 32),
                          ("eval64_portrait", "portrait", 64)):
    out[key] = arr(eval_transform(images[name], size))
    out[key + "_input"] = np.asarray(name)
    out[key + "_size"] = np.asarray(size)

  # Resized crops (top, left, height, width) -> size, enlarging and shrinking.
  boxes64 = np.asarray([[0, 0, 64, 64], [5, 9, 40, 30], [20, 3, 12, 17], [31, 40, 33, 24],
                        [2, 2, 60, 47], [50, 50, 14, 14]], np.int32)
  out["crop64_boxes"] = boxes64
  out["crop64_to32"] = np.stack([arr(F.resized_crop(images["img64"], *b, [32, 32],
                                                      interpolation=BICUBIC))
                                 for b in boxes64])
  out["crop_photo_box"] = np.asarray([20, 30, 250, 300], np.int32)
  out["crop_photo_to224"] = arr(F.resized_crop(images["photo"], 20, 30, 250, 300,
                                               [224, 224], interpolation=BICUBIC))

  # Photometric ops on the 64 px image, one parameter at a time.
  img = images["img64"]
  out["flip"] = arr(F.hflip(img))
  for op, values in (("brightness", (0.6, 0.85, 1.4)), ("contrast", (0.6, 1.2, 1.4)),
                     ("saturation", (0.0, 0.8, 1.2)), ("hue", (-0.1, -0.03, 0.05, 0.1))):
    fn = getattr(F, f"adjust_{op}")
    out[f"{op}_factors"] = np.asarray(values, np.float32)
    out[op] = np.stack([arr(fn(img, v)) for v in values])
  out["grayscale"] = arr(F.rgb_to_grayscale(img, num_output_channels=3))
  # The authors' GaussianBlur: PIL's filter with radius = sigma.
  sigmas = (0.1, 0.5, 1.0, 1.5, 2.0)
  out["blur_sigmas"] = np.asarray(sigmas, np.float32)
  out["blur"] = np.stack([arr(img.filter(ImageFilter.GaussianBlur(radius=s)))
                          for s in sigmas])
  out["blur32"] = np.stack([arr(images["img32"].filter(ImageFilter.GaussianBlur(radius=s)))
                            for s in sigmas])
  out["solarize"] = arr(ImageOps.solarize(img))

  out.update(crop_statistics())
  np.savez_compressed(args.output, **out)
  print(f"wrote {args.output}: {len(out)} arrays, {os.path.getsize(args.output)} bytes")


if __name__ == "__main__":
  main()
