"""Frozen configuration objects, built from flags at the edge and validated.

Library code takes these (or plain arguments), never FLAGS. `from_flags` is the only
place that reads absl flags; every validation error is a ConfigError whose message
names the flag and the value received.
"""

import dataclasses
import json
import os

from corinfomax_tf import augment
from corinfomax_tf import losses
from corinfomax_tf.models import projector as projector_lib
from corinfomax_tf.models import resnet

NORMALIZATIONS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Measured on the digits training split at 16x16 (grey, so equal channels).
    "digits": ((0.309, 0.309, 0.309), (0.349, 0.349, 0.349)),
}
STRATEGIES = ("default", "mirrored", "multi_worker")
MIXED_PRECISION = ("none", "float16", "bfloat16")


class ConfigError(ValueError):
  """A flag value that cannot be used; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "digits"
  data_dir: str = ""
  tfds_data_dir: str = ""
  tfds_download: bool = False
  train_split: str = "train"
  test_split: str = "test"
  image_size: int = 16
  mean: tuple = NORMALIZATIONS["digits"][0]
  std: tuple = NORMALIZATIONS["digits"][1]
  cache: bool = False
  shuffle_buffer: int = 10000
  image_check: str = "header"
  bad_images: str = "skip"
  max_image_pixels: int = 50_000_000

  def source_kwargs(self):
    """The arguments of data.load_source this config names."""
    return dict(image_size=self.image_size, data_dir=self.data_dir or None,
                tfds_data_dir=self.tfds_data_dir or None, train_split=self.train_split,
                test_split=self.test_split, tfds_download=self.tfds_download,
                cache=self.cache, image_check=self.image_check,
                bad_images=self.bad_images, max_image_pixels=self.max_image_pixels)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  view1: augment.ViewConfig = augment.ViewConfig(blur_prob=1.0, solarize_prob=0.0)
  view2: augment.ViewConfig = augment.ViewConfig(blur_prob=0.1, solarize_prob=0.2)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  depth: int = 18
  stem: str = "cifar"
  width: int = 64
  projector: str = "2048-2048-64"
  projector_bn: bool = False
  l2_normalize: bool = True
  sync_bn: bool = True


@dataclasses.dataclass(frozen=True)
class LossConfig:
  alpha: float = 250.0
  cov_weight: float = 1.0
  la_R: float = 0.01
  la_mu: float = 0.01
  eps: float = 1e-8
  R_ini: float = 1.0
  covariance: str = "per_branch"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 0.5
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup_epochs: int = 10
  warmup_start_lr: float = 3e-3
  min_lr: float = 1e-6


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  workdir: str = "runs/default"
  epochs: int = 1000
  batch_size: int = 512
  steps_per_epoch: int = 0          # 0: number of training images // batch_size
  seed: int = 0
  strategy: str = "default"
  num_cpu_devices: int = 0          # >1: split the CPU into logical devices
  cluster_resolver: str = "tf_config"
  slurm_port_base: int = 8888
  keep_checkpoints: int = 3
  loss_spike_factor: float = 0.0
  loss_spike_window: int = 50
  log_every_steps: int = 10
  probe_epochs: int = 100
  probe_random: bool = True
  online_probe: bool = False
  online_probe_lr: float = 0.1
  knn_every_epochs: int = 0
  knn_k: tuple = (20, 200)
  knn_temperature: float = 0.07
  monitor_every_steps: int = 50
  collapse_rank_share: float = 0.1
  preview_images: int = 8
  preview_only: bool = False
  deterministic: bool = False
  jit_compile: bool = False
  mixed_precision: str = "none"
  verbose: str = "auto"


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig
  augment: AugmentConfig
  model: ModelConfig
  loss: LossConfig
  optim: OptimConfig
  train: TrainConfig

  def to_dict(self):
    return dataclasses.asdict(self)

  def to_json(self):
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check(condition, flag, value, requirement):
  if not condition:
    raise ConfigError(f"--{flag}={value}: {requirement}")


def _pair(values, flag):
  """A list flag of one value (both views) or two values (view 1, view 2)."""
  try:
    floats = [float(v) for v in values]
  except ValueError:
    raise ConfigError(f"--{flag}={','.join(values)}: expected one or two numbers") from None
  _check(len(floats) in (1, 2), flag, ",".join(values), "expected one or two numbers")
  return (floats[0], floats[-1])


def _probability(value, flag):
  _check(0.0 <= value <= 1.0, flag, value, "must be a probability in [0, 1]")
  return value


def _normalization(name, dataset):
  if name == "auto":
    name = dataset if dataset in NORMALIZATIONS else "imagenet"
  _check(name in NORMALIZATIONS, "normalization", name,
         f"must be 'auto' or one of {sorted(NORMALIZATIONS)}")
  return NORMALIZATIONS[name]


def _views(f):
  crop_scale = (f.crop_min_scale, 1.0)
  _check(0.0 < f.crop_min_scale <= 1.0, "crop_min_scale", f.crop_min_scale,
         "must be in (0, 1]")
  blur = _pair(f.blur_prob, "blur_prob")
  solarize = _pair(f.solarize_prob, "solarize_prob")
  for name in ("hflip_prob", "jitter_prob", "grayscale_prob"):
    _probability(getattr(f, name), name)
  for value in blur:
    _probability(value, "blur_prob")
  for value in solarize:
    _probability(value, "solarize_prob")
  for name in ("brightness", "contrast", "saturation"):
    _check(getattr(f, name) >= 0, name, getattr(f, name), "must be >= 0")
  _check(0 <= f.hue <= 0.5, "hue", f.hue, "must be in [0, 0.5]")
  common = dict(crop_scale=crop_scale, hflip_prob=f.hflip_prob, jitter_prob=f.jitter_prob,
                brightness=f.brightness, contrast=f.contrast, saturation=f.saturation,
                hue=f.hue, grayscale_prob=f.grayscale_prob)
  return AugmentConfig(
      view1=augment.ViewConfig(blur_prob=blur[0], solarize_prob=solarize[0], **common),
      view2=augment.ViewConfig(blur_prob=blur[1], solarize_prob=solarize[1], **common))


def from_flags(f):
  """Builds and validates a Config from parsed absl flags (or any namespace)."""
  _check(f.image_size >= 8, "image_size", f.image_size, "must be >= 8")
  mean, std = _normalization(f.normalization, f.dataset)
  data = DataConfig(dataset=f.dataset, data_dir=f.data_dir, tfds_data_dir=f.tfds_data_dir,
                    tfds_download=f.tfds_download, train_split=f.train_split,
                    test_split=f.test_split, image_size=f.image_size, mean=mean, std=std,
                    cache=f.cache, shuffle_buffer=f.shuffle_buffer,
                    image_check=f.image_check, bad_images=f.bad_images,
                    max_image_pixels=f.max_image_pixels)
  _check(f.dataset != "folder" or f.data_dir, "data_dir", "''",
         "is required with --dataset=folder")
  _check(f.dataset == "folder" or not f.data_dir, "data_dir", f.data_dir,
         f"is read only with --dataset=folder (--dataset={f.dataset}); a "
         "tensorflow-datasets set takes --tfds_data_dir")
  _check(f.max_image_pixels >= 1, "max_image_pixels", f.max_image_pixels, "must be >= 1")

  _check(f.depth in resnet.BLOCKS, "depth", f.depth, f"must be one of {sorted(resnet.BLOCKS)}")
  _check(f.stem in resnet.STEMS, "stem", f.stem, f"must be one of {resnet.STEMS}")
  _check(f.width >= 1, "width", f.width, "must be >= 1")
  try:
    widths = projector_lib.parse_projector_spec(f.projector)
  except ValueError:
    raise ConfigError(f"--projector={f.projector}: must be positive integers joined by "
                      "'-', such as 2048-2048-64") from None
  model = ModelConfig(depth=f.depth, stem=f.stem, width=f.width, projector=f.projector,
                      projector_bn=f.projector_bn, l2_normalize=f.l2_normalize,
                      sync_bn=f.sync_bn)

  loss = LossConfig(alpha=f.alpha, cov_weight=f.cov_weight, la_R=f.la_R, la_mu=f.la_mu,
                    eps=f.eps, R_ini=f.R_ini, covariance=f.covariance)
  try:
    losses.validate_loss_args(dim=widths[-1], **dataclasses.asdict(loss))
  except ValueError as e:
    # "la_R must be in [0, 1). Received: la_R=1.5" -> "--la_R=1.5: must be in [0, 1)"
    message = str(e)
    name = message.split(" ", 1)[0]
    value = getattr(f, name, None)
    reason = message.split(". Received")[0].split(" ", 1)[1]
    raise ConfigError(f"--{name}={value}: {reason}") from None

  _check(f.lr > 0, "lr", f.lr, "must be > 0")
  _check(0 <= f.momentum < 1, "momentum", f.momentum, "must be in [0, 1)")
  _check(f.weight_decay >= 0, "weight_decay", f.weight_decay, "must be >= 0")
  _check(f.warmup_epochs >= 0, "warmup_epochs", f.warmup_epochs, "must be >= 0")
  _check(f.min_lr >= 0, "min_lr", f.min_lr, "must be >= 0")
  optim = OptimConfig(lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay,
                      warmup_epochs=f.warmup_epochs, warmup_start_lr=f.warmup_start_lr,
                      min_lr=f.min_lr)

  _check(bool(f.workdir), "workdir", "''", "must name a directory")
  _check(f.epochs >= 1, "epochs", f.epochs, "must be >= 1")
  _check(f.batch_size >= 2, "batch_size", f.batch_size, "must be >= 2 (covariance of a batch)")
  _check(f.steps_per_epoch >= 0, "steps_per_epoch", f.steps_per_epoch, "must be >= 0")
  _check(f.strategy in STRATEGIES, "strategy", f.strategy, f"must be one of {STRATEGIES}")
  _check(f.num_cpu_devices >= 0, "num_cpu_devices", f.num_cpu_devices, "must be >= 0")
  _check(f.cluster_resolver == "tf_config" or f.strategy == "multi_worker",
         "cluster_resolver", f.cluster_resolver,
         f"is read only with --strategy=multi_worker (--strategy={f.strategy})")
  _check(f.num_cpu_devices == 0 or f.strategy == "mirrored", "num_cpu_devices",
         f.num_cpu_devices, f"is read only with --strategy=mirrored (--strategy={f.strategy})")
  _check(f.keep_checkpoints >= 1, "keep_checkpoints", f.keep_checkpoints, "must be >= 1")
  _check(f.loss_spike_factor == 0 or f.loss_spike_factor > 1, "loss_spike_factor",
         f.loss_spike_factor, "must be 0 (off) or > 1")
  _check(f.loss_spike_window >= 5, "loss_spike_window", f.loss_spike_window, "must be >= 5")
  _check(f.log_every_steps >= 1, "log_every_steps", f.log_every_steps, "must be >= 1")
  _check(f.probe_epochs >= 0, "probe_epochs", f.probe_epochs, "must be >= 0")
  _check(f.online_probe_lr > 0, "online_probe_lr", f.online_probe_lr, "must be > 0")
  _check(f.knn_every_epochs >= 0, "knn_every_epochs", f.knn_every_epochs, "must be >= 0")
  try:
    knn_k = tuple(int(k) for k in f.knn_k)
  except ValueError:
    knn_k = ()
  _check(knn_k and all(k >= 1 for k in knn_k), "knn_k", ",".join(f.knn_k),
         "must be positive integers")
  _check(f.knn_temperature > 0, "knn_temperature", f.knn_temperature, "must be > 0")
  _check(f.monitor_every_steps >= 0, "monitor_every_steps", f.monitor_every_steps,
         "must be >= 0")
  _check(0 <= f.collapse_rank_share <= 1, "collapse_rank_share", f.collapse_rank_share,
         "must be in [0, 1]")
  _check(f.preview_images >= 0, "preview_images", f.preview_images, "must be >= 0")
  _check(f.mixed_precision in MIXED_PRECISION, "mixed_precision", f.mixed_precision,
         f"must be one of {MIXED_PRECISION}")
  _check(f.verbose in ("auto", "0", "1", "2"), "verbose", f.verbose,
         "must be auto, 0, 1 or 2")
  train = TrainConfig(workdir=f.workdir, epochs=f.epochs, batch_size=f.batch_size,
                      steps_per_epoch=f.steps_per_epoch, seed=f.seed, strategy=f.strategy,
                      num_cpu_devices=f.num_cpu_devices,
                      cluster_resolver=f.cluster_resolver,
                      slurm_port_base=f.slurm_port_base,
                      keep_checkpoints=f.keep_checkpoints,
                      loss_spike_factor=f.loss_spike_factor,
                      loss_spike_window=f.loss_spike_window,
                      log_every_steps=f.log_every_steps, probe_epochs=f.probe_epochs,
                      probe_random=f.probe_random, online_probe=f.online_probe,
                      online_probe_lr=f.online_probe_lr,
                      knn_every_epochs=f.knn_every_epochs, knn_k=knn_k,
                      knn_temperature=f.knn_temperature,
                      monitor_every_steps=f.monitor_every_steps,
                      collapse_rank_share=f.collapse_rank_share,
                      preview_images=f.preview_images, preview_only=f.preview_only,
                      deterministic=f.deterministic,
                      jit_compile=f.jit_compile,
                      mixed_precision=f.mixed_precision, verbose=f.verbose)
  return Config(data=data, augment=_views(f), model=model, loss=loss, optim=optim,
                train=train)


# Sections whose change makes an existing checkpoint the wrong one to resume from.
_RESUME_KEYS = ("model", "loss")


def check_resume_compatible(saved, current):
  """Compares the saved config dict of a workdir with the current Config."""
  now = current.to_dict()
  for section in _RESUME_KEYS:
    for key, value in now[section].items():
      old = saved.get(section, {}).get(key, value)
      if section == "model" and key == "sync_bn":
        continue  # a replica-count choice; the weights are the same
      if _normalise(old) != _normalise(value):
        raise ConfigError(f"--{key}={value}: the workdir {current.train.workdir!r} was "
                          f"trained with {key}={old}; use a new --workdir or the same value")


def _normalise(value):
  return json.loads(json.dumps(value))


def load_saved_config(workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return json.load(fh)
