"""The settings of one augmented view: a plain dataclass, importable without
TensorFlow (the command line reads its defaults before TensorFlow starts)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Probabilities and strengths of one view's augmentation (torchvision's
  definitions, as the authors' transforms use them).

  Args:
    crop_scale: RandomResizedCrop's (min, max) area share.
    crop_ratio: RandomResizedCrop's (min, max) aspect ratio.
    hflip_prob: horizontal flip probability.
    jitter_prob: probability of the colour jitter (its four ops in random order).
    brightness: the jitter's brightness strength.
    contrast: the jitter's contrast strength.
    saturation: the jitter's saturation strength.
    hue: the jitter's hue strength.
    grayscale_prob: grayscale probability.
    blur_prob: Gaussian blur probability.
    blur_sigma: the blur's (min, max) sigma.
    solarize_prob: solarisation probability.

  Example:

  ```python
  view1, view2 = corinfomax_tf.PAPER_VIEWS
  milder = dataclasses.replace(view1, crop_scale=(0.25, 1.0), hflip_prob=0.0)
  views = corinfomax_tf.two_views(images, image_size=32, batch_size=256,
                                  views=(milder, dataclasses.replace(view2, hflip_prob=0.0)))
  ```
  """
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
