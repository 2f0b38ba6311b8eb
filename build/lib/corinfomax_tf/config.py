"""Frozen configuration objects, built from flags at the edge and validated.

Library code takes these (or plain arguments), never FLAGS. `from_flags` is the only
place that reads absl flags; every validation error is an errors.ConfigError whose message
names the flag and the value received.
"""

import dataclasses
import json
import os
import re

from corinfomax_tf.data import augment
from corinfomax_tf.method import losses
from corinfomax_tf.models import projector as projector_lib
from corinfomax_tf.models import resnet
from corinfomax_tf import errors

NORMALIZATIONS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Measured on the digits training split at 16x16 (grey, so equal channels).
    "digits": ((0.309, 0.309, 0.309), (0.349, 0.349, 0.349)),
}
STRATEGIES = ("default", "mirrored", "multi_worker")


def setting(default, help, choices=None):  # noqa: A002  (the flag's help text)
  """A config field that is also a command-line flag of the same name: its default
  and help live here, and `flags.define_config_flags` derives the flag from them."""
  metadata = {"help": help}
  if choices:
    metadata["choices"] = tuple(choices)
  return dataclasses.field(default=default, metadata=metadata)


MIXED_PRECISION = ("none", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = setting(
      "digits",
      "'digits' (embedded default), a tensorflow-datasets name (cifar10, cifar100, "
      "...), 'folder' (a labelled image folder under --data_dir) or 'images' (your "
      'own unlabeled images: any tree of image files under --data_dir, or a text file'
      ' of paths).')
  data_dir: str = setting(
      "",
      'With --dataset=folder: directory holding <train_split>/<class>/<image> and '
      '<test_split>/<class>/<image>. With --dataset=images: a directory (images in '
      'any nesting of folders) or a text file with one image path per line (relative '
      "to the file's folder).")
  tfds_data_dir: str = setting("", 'tensorflow-datasets data_dir.')
  tfds_download: bool = setting(
      True,
      'Download and prepare a tfds data set that is not prepared yet, after a quick '
      'check that the network answers (--notfds_download: never download).')
  train_split: str = setting("train", 'Split (or sub-folder) to pretrain on.')
  test_split: str = setting("test", "Split (or sub-folder) for the probe's test.")
  image_size: int = setting(32, 'Training crop size.')
  mean: tuple = NORMALIZATIONS["digits"][0]
  std: tuple = NORMALIZATIONS["digits"][1]
  cache: bool = setting(False, 'Cache decoded images of an image folder in memory.')
  shuffle_buffer: int = setting(10000, 'Shuffle buffer, in images.')
  data_service: str = setting(
      "",
      'grpc://host:port of a tf.data service dispatcher: its workers read, decode and'
      ' augment the training images (--dataset=folder or images, at the same paths on'
      " every worker host); see README, 'Feeding training from a tf.data service'.")
  image_check: str = setting(
      "header",
      'With --dataset=folder, how every file is checked before '
      'training: none (extension and size), header (format, size, truncation; the '
      'default), full (decode every image: slow on large sets).', choices=('none', 'header', 'full'))
  bad_images: str = setting(
      "skip",
      'With --dataset=folder: skip bad files (counted in the log and in'
      ' data_report.json) or stop at the first, naming it.', choices=('skip', 'error'))
  max_image_pixels: int = setting(
      50_000_000,
      'With --dataset=folder: images with more pixels are skipped as too large.')
  # Pretraining only: the labelled set the probe and kNN monitor evaluate on, when it
  # is not the training set (always, for --dataset=images).
  eval_dataset: str = setting(
      "",
      "The labelled set the end-of-training probe and the kNN monitor use ('digits', "
      "'folder' or a tensorflow-datasets name; empty: the training set). Without one,"
      ' --dataset=images skips them, saying so.')
  eval_data_dir: str = setting(
      "",
      'With --eval_dataset=folder: <eval_train_split>/<class>/<image> and '
      '<eval_test_split>/<class>/<image>.')
  eval_train_split: str = setting(
      "train",
      "--eval_dataset's split the probe trains on.")
  eval_test_split: str = setting(
      "test",
      "--eval_dataset's split the probe and kNN are measured on.")

  @property
  def labelled(self):
    return self.dataset != "images"

  def eval_data(self):
    """The DataConfig of the set evaluation runs on; None when there is none."""
    if not self.eval_dataset:
      return self if self.labelled else None
    return dataclasses.replace(
        self, dataset=self.eval_dataset, data_dir=self.eval_data_dir,
        train_split=self.eval_train_split, test_split=self.eval_test_split, cache=False,
        eval_dataset="", eval_data_dir="")

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
  # "resnet" (--depth, --stem, --width), resnet18/34/50, or a keras-hub preset (a
  # directory, an export of ours, or a name keras-hub fetches).
  backbone: str = setting(
      "resnet",
      'The encoder: resnet (our ResNet of --depth, --stem, --width), resnet18, '
      'resnet34, resnet50, or a keras-hub preset with its weights (a preset '
      'directory, an export of ours, or a name keras-hub fetches, such as '
      'vit_base_patch16_224_imagenet): continued pretraining on your data.')
  backbone_config: str = setting(
      "",
      'A JSON file of any keras-hub or Keras backbone, as '
      'keras.saving.serialize_keras_object writes it (new random weights).')
  depth: int = setting(18, 'ResNet depth: 18, 34 or 50.')
  stem: str = setting("cifar", 'ResNet stem: cifar or imagenet.')
  width: int = setting(64, 'Filters of the first ResNet stage (64 standard).')
  projector: str = setting("2048-2048-64", 'Projector widths, last = D.')
  projector_bn: bool = setting(False, "BatchNorm in the projector's hidden layers.")
  l2_normalize: bool = setting(True, 'L2-normalise projector outputs.')
  sync_bn: bool = setting(
      True,
      'Synchronise BatchNorm across replicas (only when there are several).')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  alpha: float = setting(250.0, 'Attraction weight.')
  cov_weight: float = setting(1.0, 'Covariance (big-bang) term weight.')
  la_R: float = setting(0.01, 'Covariance forgetting factor, in [0, 1).')
  la_mu: float = setting(0.01, 'Mean forgetting factor, in [0, 1).')
  eps: float = setting(1e-8, 'Diagonal perturbation of R in the log-determinant.')
  R_ini: float = setting(1.0, 'R starts as R_ini * I.')
  covariance: str = setting(
      "per_branch",
      'One (mu, R) per view, or one over both views.', choices=('per_branch', 'shared'))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = setting(0.5, 'Base learning rate (for the global batch).')
  momentum: float = setting(0.9, 'SGD momentum.')
  weight_decay: float = setting(1e-4, 'Coupled L2 weight decay (PyTorch SGD).')
  warmup_epochs: int = setting(10, 'Linear warm-up epochs.')
  warmup_start_lr: float = setting(3e-3, 'Learning rate at step 0.')
  min_lr: float = setting(1e-6, 'Learning rate at the end of the cosine.')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  workdir: str = setting(
      "runs/default",
      'Checkpoints, TensorBoard logs, resolved flags and summary.json go here.')
  epochs: int = setting(1000, 'Pretraining epochs.')
  batch_size: int = setting(512, 'Global batch size (all replicas).')
  steps_per_epoch: int = setting(
      0,
      'Steps per epoch; 0 = training images // batch size.')
  seed: int = setting(0, 'Seed of weights, data order and augmentation.')
  strategy: str = setting(
      "default",
      'default (one device), mirrored (all local GPUs, or --num_cpu_devices CPUs), '
      'multi_worker (TF_CONFIG).')
  num_cpu_devices: int = setting(
      0,
      'With --strategy=mirrored and no GPU: split the CPU into this many devices.')
  cluster_resolver: str = setting(
      "tf_config",
      'With --strategy=multi_worker: the cluster from TF_CONFIG, '
      "or from SLURM's variables (every task started by srun).", choices=('tf_config', 'slurm'))
  slurm_port_base: int = setting(
      8888,
      "With --cluster_resolver=slurm: first port of the workers' servers.")
  keep_checkpoints: int = setting(3, 'Checkpoints kept in the workdir.')
  export: bool = setting(
      False,
      'After training, export the encoder (SavedModel + keras-hub preset) to '
      '--export_dir and check it reloads (as `corinfomax export` does).')
  export_dir: str = setting(
      "",
      "With --export: the export's path (a link to the newest step); empty: "
      '<workdir>/export.')
  loss_spike_factor: float = setting(
      0.0,
      "Stop, keeping the last checkpoint, when a step's loss exceeds this many times "
      'the median of the previous --loss_spike_window steps (0: off).')
  loss_spike_window: int = setting(
      50,
      'Steps whose median loss the spike guard compares against.')
  log_every_steps: int = setting(10, 'TensorBoard scalar interval, in steps.')
  probe_epochs: int = setting(
      100,
      'Epochs of the linear probe after pretraining; 0 skips the probe.')
  probe_random: bool = setting(
      True,
      'Also probe a randomly initialised encoder of the same architecture.')
  online_probe: bool = setting(
      False,
      'Train a linear head on stop-gradient features alongside (logs probe_top1).')
  online_probe_lr: float = setting(0.1, 'Learning rate of the online probe.')
  knn_every_epochs: int = setting(
      0,
      'kNN top-1 on the test split every N epochs (0: off).')
  knn_k: tuple = setting((20, 200), 'Neighbour counts of the kNN monitor.')
  knn_temperature: float = setting(0.07, 'Temperature of the kNN votes.')
  monitor_every_steps: int = setting(
      50,
      'Covariance spectra, effective rank, LDMI and collapse checks every N steps (0:'
      ' off).')
  collapse_rank_share: float = setting(
      0.1,
      'Warn of dimensional collapse when the effective rank of R falls below this '
      'share of D.')
  preview_images: int = setting(
      8,
      'Images in the augmentation preview written at the start of training (0: off).')
  preview_only: bool = setting(
      False,
      'Write the augmentation preview (TensorBoard and preview.png) and exit.')
  deterministic: bool = setting(
      False,
      'Deterministic ops (tf.config.experimental.enable_op_determinism) and a fixed '
      'data order: two runs give bitwise-equal weights on the CPU.')
  jit_compile: bool = setting(False, 'Compile the training step with XLA.')
  mixed_precision: str = setting("none", 'none, float16 or bfloat16.')
  verbose: str = setting(
      "auto",
      'Keras fit verbosity: auto (progress bar on a terminal, a line per epoch '
      'otherwise), 0, 1 or 2.')


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
    raise errors.ConfigError(f"--{flag}={value}: {requirement}")


def _pair(values, flag):
  """A list flag of one value (both views) or two values (view 1, view 2)."""
  try:
    floats = [float(v) for v in values]
  except ValueError:
    raise errors.ConfigError(f"--{flag}={','.join(values)}: expected one or two numbers") from None
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


def _from_flags(cls, f, **computed):
  """A config section whose fields are flags of the same names (`computed`: the
  fields that are not plain flag values)."""
  return cls(**{field.name: computed[field.name] if field.name in computed
                else getattr(f, field.name) for field in dataclasses.fields(cls)})


def from_flags(f):
  """Builds and validates a Config from parsed absl flags (or any namespace)."""
  data = _data_section(f)
  model, dim = _model_section(f)
  loss = _loss_section(f, dim)
  optim = _optim_section(f)
  train = _train_section(f)
  return Config(data=data, augment=_views(f), model=model, loss=loss, optim=optim,
                train=train)


def _given(f, name):
  """Whether a flag was set on the command line or in a flagfile (False for a plain
  namespace, which cannot tell)."""
  try:
    return bool(f[name].present)
  except (TypeError, KeyError):
    return False


def _data_dir_checks(f, dataset_flag="dataset", data_dir_flag="data_dir"):
  dataset, data_dir = getattr(f, dataset_flag), getattr(f, data_dir_flag)
  _check(dataset not in ("folder", "images") or data_dir, data_dir_flag, "''",
         f"is required with --{dataset_flag}={dataset}")
  _check(dataset in ("folder", "images") or not data_dir, data_dir_flag, data_dir,
         f"is read only with --{dataset_flag}=folder or images (--{dataset_flag}="
         f"{dataset}); a tensorflow-datasets set takes --tfds_data_dir")


def _data_section(f):
  _check(f.image_size >= 8, "image_size", f.image_size, "must be >= 8")
  mean, std = _normalization(f.normalization, f.dataset)
  data = _from_flags(DataConfig, f, mean=mean, std=std)
  _data_dir_checks(f)
  _check(f.max_image_pixels >= 1, "max_image_pixels", f.max_image_pixels, "must be >= 1")
  if f.dataset == "images":
    # The defaults are allowed: a run's resolved flags.cfg names every flag.
    for name in ("train_split", "test_split"):
      _check(getattr(f, name) == getattr(DataConfig, name), name, getattr(f, name),
             "--dataset=images has no splits (every image under --data_dir is trained "
             "on); evaluate on a labelled set with --eval_dataset")
    _check(f.eval_dataset != "images", "eval_dataset", "images",
           "must be a labelled set: 'digits', 'folder' or a tensorflow-datasets name")
  if f.data_service:
    _check(re.fullmatch(r"(grpc://)?[^:/\s]+:\d+", f.data_service), "data_service",
           f.data_service, "expected grpc://host:port (a tf.data service dispatcher)")
    _check(f.dataset in ("folder", "images"), "data_service", f.data_service,
           f"needs image files its workers read (--dataset=folder or images), not "
           f"--dataset={f.dataset}: a tensorflow-datasets set or the digits are read "
           "here (save them as an image folder to use a service)")
    _check(not f.cache, "data_service", f.data_service,
           "and --cache exclude each other (the service's workers decode the images)")
    data = dataclasses.replace(data, data_service=f.data_service if "://" in
                               f.data_service else "grpc://" + f.data_service)
  if f.eval_dataset:
    _data_dir_checks(f, "eval_dataset", "eval_data_dir")
  else:
    _check(not f.eval_data_dir, "eval_data_dir", f.eval_data_dir,
           "is read only with --eval_dataset=folder")
  return data


def _model_section(f):
  """(ModelConfig, projector output dimension D)."""
  from corinfomax_tf.models import factory
  computed = {}
  if f.backbone_config:
    _check(f.backbone == "resnet", "backbone_config", f.backbone_config,
           f"and --backbone={f.backbone} name two backbones; keep one")
    factory.read_backbone_config(f.backbone_config)   # one line naming the file
  elif factory.is_resnet(f.backbone) and factory.RESNETS[f.backbone]:
    depth = factory.RESNETS[f.backbone]
    _check(not _given(f, "depth") or f.depth == depth, "depth", f.depth,
           f"contradicts --backbone={f.backbone}; keep one")
    computed["depth"] = depth
  elif not factory.is_resnet(f.backbone):
    _check(bool(f.backbone.strip()), "backbone", "''",
           "must name a backbone: resnet18, resnet34, resnet50 or a keras-hub preset")
  depth = computed.get("depth", f.depth)
  _check(depth in resnet.BLOCKS, "depth", f.depth, f"must be one of {sorted(resnet.BLOCKS)}")
  _check(f.stem in resnet.STEMS, "stem", f.stem, f"must be one of {resnet.STEMS}")
  _check(f.width >= 1, "width", f.width, "must be >= 1")
  try:
    widths = projector_lib.parse_projector_spec(f.projector)
  except ValueError:
    raise errors.ConfigError(f"--projector={f.projector}: must be positive integers joined "
                             "by '-', such as 2048-2048-64") from None
  return _from_flags(ModelConfig, f, **computed), widths[-1]


def _loss_section(f, dim):
  loss = _from_flags(LossConfig, f)
  try:
    losses.validate_loss_args(dim=dim, **dataclasses.asdict(loss))
  except ValueError as e:
    # "la_R must be in [0, 1). Received: la_R=1.5" -> "--la_R=1.5: must be in [0, 1)"
    message = str(e)
    name = message.split(" ", 1)[0]
    value = getattr(f, name, None)
    reason = message.split(". Received")[0].split(" ", 1)[1]
    raise errors.ConfigError(f"--{name}={value}: {reason}") from None
  return loss


def _optim_section(f):
  _check(f.lr > 0, "lr", f.lr, "must be > 0")
  _check(0 <= f.momentum < 1, "momentum", f.momentum, "must be in [0, 1)")
  _check(f.weight_decay >= 0, "weight_decay", f.weight_decay, "must be >= 0")
  _check(f.warmup_epochs >= 0, "warmup_epochs", f.warmup_epochs, "must be >= 0")
  _check(f.min_lr >= 0, "min_lr", f.min_lr, "must be >= 0")
  return _from_flags(OptimConfig, f)


def _train_section(f):
  _check(bool(f.workdir), "workdir", "''", "must name a directory")
  _checks(f, [
      ("epochs", f.epochs >= 1, "must be >= 1"),
      ("batch_size", f.batch_size >= 2, "must be >= 2 (covariance of a batch)"),
      ("steps_per_epoch", f.steps_per_epoch >= 0, "must be >= 0"),
      ("strategy", f.strategy in STRATEGIES, f"must be one of {STRATEGIES}"),
      ("num_cpu_devices", f.num_cpu_devices >= 0, "must be >= 0"),
      ("cluster_resolver", f.cluster_resolver == "tf_config" or
       f.strategy == "multi_worker",
       f"is read only with --strategy=multi_worker (--strategy={f.strategy})"),
      ("num_cpu_devices", f.num_cpu_devices == 0 or f.strategy == "mirrored",
       f"is read only with --strategy=mirrored (--strategy={f.strategy})"),
      ("keep_checkpoints", f.keep_checkpoints >= 1, "must be >= 1"),
      ("loss_spike_factor", f.loss_spike_factor == 0 or f.loss_spike_factor > 1,
       "must be 0 (off) or > 1"),
      ("loss_spike_window", f.loss_spike_window >= 5, "must be >= 5"),
      ("log_every_steps", f.log_every_steps >= 1, "must be >= 1"),
      ("probe_epochs", f.probe_epochs >= 0, "must be >= 0"),
      ("online_probe_lr", f.online_probe_lr > 0, "must be > 0"),
      ("knn_every_epochs", f.knn_every_epochs >= 0, "must be >= 0"),
      ("online_probe", not f.online_probe or f.dataset != "images",
       "trains on the training images' labels, and --dataset=images has none "
       "(the end-of-training probe and --knn_every_epochs use --eval_dataset)")])
  knn_k = _positive_ints(f.knn_k, "knn_k")
  _checks(f, [
      ("knn_temperature", f.knn_temperature > 0, "must be > 0"),
      ("monitor_every_steps", f.monitor_every_steps >= 0, "must be >= 0"),
      ("collapse_rank_share", 0 <= f.collapse_rank_share <= 1, "must be in [0, 1]"),
      ("preview_images", f.preview_images >= 0, "must be >= 0"),
      ("mixed_precision", f.mixed_precision in MIXED_PRECISION,
       f"must be one of {MIXED_PRECISION}"),
      ("verbose", f.verbose in ("auto", "0", "1", "2"), "must be auto, 0, 1 or 2")])
  return _from_flags(TrainConfig, f, knn_k=knn_k)


def _normalise(value):
  return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------
# The downstream commands' configs (linear and kNN evaluation, fine-tuning,
# detection, export): one frozen dataclass each, built from flags here only.
# ----------------------------------------------------------------------------


def _checks(f, checks):
  """[(flag, ok, requirement)] -> the first failing one as a ConfigError."""
  for name, ok, requirement in checks:
    _check(ok, name, getattr(f, name), requirement)


def _positive_ints(values, flag):
  try:
    ints = tuple(int(v) for v in values)
  except ValueError:
    ints = ()
  _check(ints and min(ints) >= 1, flag, ",".join(str(v) for v in values),
         "must be positive integers")
  return ints


def _parent_of(path):
  return os.path.dirname(os.path.normpath(path)) or "."


def eval_data_from_flags(f):
  """The data flags every evaluation and fine-tuning command shares."""
  _data_dir_checks(f)
  _check(f.max_image_pixels >= 1, "max_image_pixels", f.max_image_pixels, "must be >= 1")
  # image_size 0: the encoder's (datasets.resolve_image_size).
  return DataConfig(dataset=f.dataset, data_dir=f.data_dir, tfds_data_dir=f.tfds_data_dir,
                    tfds_download=f.tfds_download, train_split=f.train_split,
                    test_split=f.test_split,
                    image_size=f.image_size if _given(f, "image_size") else 0,
                    image_check=f.image_check, bad_images=f.bad_images,
                    max_image_pixels=f.max_image_pixels)


# The data settings a resume must keep: which images, at which size (not where they
# are found, whether they may be downloaded, or how carefully files are checked).
_DATA_RESUME_KEYS = ("data.dataset", "data.train_split", "data.test_split",
                     "data.image_size")


@dataclasses.dataclass(frozen=True)
class LinearEvalConfig:
  encoder: str
  workdir: str
  data: DataConfig
  num_classes: int = 0
  epochs: int = 100
  batch_size: int = 256
  lr: float = 0.2
  min_lr: float = 2e-3
  schedule: str = "cosine"
  step_epochs: int = 20
  momentum: float = 0.9
  weight_decay: float = 0.0
  augment: bool = True
  crop_min_scale: float = 0.08
  precompute_features: bool = False
  eval_every_epochs: int = 10
  keep_checkpoints: int = 2
  seed: int = 0
  deterministic: bool = False

  # Settings whose change makes a checkpoint of this workdir the wrong one.
  RESUME_KEYS = ("encoder", *_DATA_RESUME_KEYS, "batch_size", "lr", "min_lr",
                 "schedule", "step_epochs", "momentum", "weight_decay", "augment",
                 "precompute_features", "crop_min_scale", "seed")


def linear_eval_from_flags(f):
  _checks(f, [("epochs", f.epochs >= 1, "must be >= 1"),
              ("batch_size", f.batch_size >= 1, "must be >= 1"),
              ("lr", f.lr > 0, "must be > 0"),
              ("min_lr", f.min_lr >= 0, "must be >= 0"),
              ("step_epochs", f.step_epochs >= 1, "must be >= 1"),
              ("momentum", 0 <= f.momentum < 1, "must be in [0, 1)"),
              ("weight_decay", f.weight_decay >= 0, "must be >= 0"),
              ("crop_min_scale", 0 < f.crop_min_scale <= 1, "must be in (0, 1]"),
              ("eval_every_epochs", f.eval_every_epochs >= 1, "must be >= 1"),
              ("keep_checkpoints", f.keep_checkpoints >= 1, "must be >= 1"),
              ("num_classes", f.num_classes >= 0, "must be >= 0")])
  _check(not (f.precompute_features and f.augment), "precompute_features", True,
         "requires --noaugment (augmented images give new features every epoch)")
  return LinearEvalConfig(
      encoder=f.encoder, workdir=f.output_dir or os.path.join(_parent_of(f.encoder),
                                                              "linear_eval"),
      data=eval_data_from_flags(f), num_classes=f.num_classes, epochs=f.epochs,
      batch_size=f.batch_size, lr=f.lr, min_lr=f.min_lr, schedule=f.schedule,
      step_epochs=f.step_epochs, momentum=f.momentum, weight_decay=f.weight_decay,
      augment=f.augment, crop_min_scale=f.crop_min_scale,
      precompute_features=f.precompute_features, eval_every_epochs=f.eval_every_epochs,
      keep_checkpoints=f.keep_checkpoints, seed=f.seed, deterministic=f.deterministic)


@dataclasses.dataclass(frozen=True)
class KnnEvalConfig:
  encoder: str
  workdir: str
  data: DataConfig
  num_classes: int = 0
  k: tuple = (20, 200)
  temperature: float = 0.07


def knn_eval_from_flags(f):
  _checks(f, [("temperature", f.temperature > 0, "must be > 0"),
              ("num_classes", f.num_classes >= 0, "must be >= 0")])
  return KnnEvalConfig(
      encoder=f.encoder, workdir=f.output_dir or os.path.join(_parent_of(f.encoder),
                                                              "knn_eval"),
      data=eval_data_from_flags(f), num_classes=f.num_classes,
      k=_positive_ints(f.k, "k"), temperature=f.temperature)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  encoder: str
  workdir: str
  data: DataConfig
  init: str = "pretrained"
  label_fraction: float = 0.1
  subset_seed: int = 0
  epochs: int = 20
  batch_size: int = 256
  backbone_lr: float = 0.005
  head_lr: float = 10.0
  lr_decay_epochs: tuple = (12, 16)
  lr_decay_factor: float = 0.2
  momentum: float = 0.9
  weight_decay: float = 0.0
  crop_min_scale: float = 0.08
  hflip_prob: float = 0.5
  eval_every_epochs: int = 5
  keep_checkpoints: int = 2
  seed: int = 0
  deterministic: bool = False

  # The labelled subset (fraction, seed) is checked by label_subsets, naming its file.
  RESUME_KEYS = ("encoder", *_DATA_RESUME_KEYS, "init", "batch_size", "backbone_lr",
                 "head_lr", "lr_decay_epochs", "lr_decay_factor", "momentum",
                 "weight_decay", "crop_min_scale", "hflip_prob", "seed")


def finetune_from_flags(f):
  _check(0 < f.label_fraction <= 1, "label_fraction", f.label_fraction, "must be in (0, 1]")
  _checks(f, [("epochs", f.epochs >= 1, "must be >= 1"),
              ("batch_size", f.batch_size >= 2, "must be >= 2"),
              ("backbone_lr", f.backbone_lr >= 0, "must be >= 0"),
              ("head_lr", f.head_lr > 0, "must be > 0"),
              ("lr_decay_factor", 0 < f.lr_decay_factor <= 1, "must be in (0, 1]"),
              ("momentum", 0 <= f.momentum < 1, "must be in [0, 1)"),
              ("weight_decay", f.weight_decay >= 0, "must be >= 0"),
              ("crop_min_scale", 0 < f.crop_min_scale <= 1, "must be in (0, 1]"),
              ("hflip_prob", 0 <= f.hflip_prob <= 1, "must be in [0, 1]"),
              ("eval_every_epochs", f.eval_every_epochs >= 1, "must be >= 1"),
              ("keep_checkpoints", f.keep_checkpoints >= 1, "must be >= 1")])
  decay = _positive_ints(f.lr_decay_epochs, "lr_decay_epochs")
  _check(list(decay) == sorted(decay), "lr_decay_epochs", ",".join(f.lr_decay_epochs),
         "must be increasing positive epochs")
  workdir = f.workdir or os.path.join(_parent_of(f.encoder),
                                      f"finetune_{f.label_fraction:g}_{f.init}")
  return FinetuneConfig(
      encoder=f.encoder, workdir=workdir, data=eval_data_from_flags(f), init=f.init,
      label_fraction=f.label_fraction, subset_seed=f.subset_seed, epochs=f.epochs,
      batch_size=f.batch_size, backbone_lr=f.backbone_lr, head_lr=f.head_lr,
      lr_decay_epochs=decay, lr_decay_factor=f.lr_decay_factor, momentum=f.momentum,
      weight_decay=f.weight_decay, crop_min_scale=f.crop_min_scale,
      hflip_prob=f.hflip_prob, eval_every_epochs=f.eval_every_epochs,
      keep_checkpoints=f.keep_checkpoints, seed=f.seed, deterministic=f.deterministic)


@dataclasses.dataclass(frozen=True)
class DetectionDataConfig:
  dataset: str = "generated"
  tfds_data_dir: str = ""
  train_split: str = "train"
  test_split: str = "validation"
  train_annotations: str = ""
  train_images: str = ""
  test_annotations: str = ""
  test_images: str = ""
  num_train_images: int = 512
  num_test_images: int = 128
  data_seed: int = 0
  image_size: int = 48
  max_boxes: int = 4


@dataclasses.dataclass(frozen=True)
class DetectConfig:
  encoder: str
  workdir: str
  data: DetectionDataConfig
  init: str = "pretrained"
  min_level: int = 0
  max_level: int = 0
  anchor_size: float = 0.0          # 0: by stem
  head_convs: int = 2
  epochs: int = 12
  batch_size: int = 16
  lr: float = 0.01
  warmup_epochs: int = 1
  momentum: float = 0.9
  weight_decay: float = 1e-4
  clipnorm: float = 10.0
  eval_every_epochs: int = 4
  keep_checkpoints: int = 2
  seed: int = 0
  deterministic: bool = False

  RESUME_KEYS = ("encoder", "data.dataset", "data.image_size", "data.num_train_images",
                 "data.data_seed", "data.max_boxes", "init", "min_level", "max_level",
                 "anchor_size", "head_convs", "batch_size", "lr", "warmup_epochs", "momentum",
                 "weight_decay", "clipnorm", "seed")


def detect_from_flags(f):
  _checks(f, [("epochs", f.epochs >= 1, "must be >= 1"),
              ("batch_size", f.batch_size >= 1, "must be >= 1"),
              ("lr", f.lr > 0, "must be > 0"),
              ("image_size", f.image_size >= 16, "must be >= 16"),
              ("max_boxes", f.max_boxes >= 1, "must be >= 1"),
              ("head_convs", f.head_convs >= 1, "must be >= 1"),
              ("anchor_size", f.anchor_size >= 0, "must be >= 0 (0: by stem)"),
              ("eval_every_epochs", f.eval_every_epochs >= 1, "must be >= 1"),
              ("keep_checkpoints", f.keep_checkpoints >= 1, "must be >= 1"),
              ("warmup_epochs", f.warmup_epochs >= 0, "must be >= 0"),
              ("num_train_images", f.num_train_images >= 1, "must be >= 1"),
              ("num_test_images", f.num_test_images >= 1, "must be >= 1")])
  if f.dataset == "coco_json":
    for name in ("train_annotations", "train_images", "test_annotations", "test_images"):
      _check(bool(getattr(f, name)), name, "''", "is required with --dataset=coco_json")
  data = DetectionDataConfig(
      dataset=f.dataset, tfds_data_dir=f.tfds_data_dir, train_split=f.train_split,
      test_split=f.test_split, train_annotations=f.train_annotations,
      train_images=f.train_images, test_annotations=f.test_annotations,
      test_images=f.test_images, num_train_images=f.num_train_images,
      num_test_images=f.num_test_images, data_seed=f.data_seed,
      image_size=f.image_size, max_boxes=f.max_boxes)
  workdir = f.workdir or os.path.join(_parent_of(f.encoder),
                                      f"detect_{f.dataset.replace('/', '_')}_{f.init}")
  return DetectConfig(
      encoder=f.encoder, workdir=workdir, data=data, init=f.init, min_level=f.min_level,
      max_level=f.max_level, anchor_size=f.anchor_size, head_convs=f.head_convs,
      epochs=f.epochs,
      batch_size=f.batch_size, lr=f.lr, warmup_epochs=f.warmup_epochs,
      momentum=f.momentum, weight_decay=f.weight_decay, clipnorm=f.clipnorm,
      eval_every_epochs=f.eval_every_epochs, keep_checkpoints=f.keep_checkpoints,
      seed=f.seed, deterministic=f.deterministic)


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  encoder: str
  workdir: str
  data: DataConfig              # image_size 0: the encoder's
  split: str = "test"
  max_images: int = 0
  batch_size: int = 256
  sprite: bool = True
  query: tuple = ()
  k: int = 10

  # What the embeddings are of: a rerun with the same settings reuses them.
  ARRAY_KEYS = ("encoder", "data.dataset", "data.data_dir", "data.tfds_data_dir",
                "data.image_size", "data.image_check", "data.bad_images",
                "data.max_image_pixels", "split", "max_images", "sprite")


def embed_from_flags(f):
  _data_dir_checks(f)
  images = f.dataset == "images"
  for name in ("train_split", "test_split"):
    _check(not _given(f, name), name, getattr(f, name),
           "embed reads one split, named by --split")
  _check(not (images and _given(f, "split")), "split", f.split,
         "--dataset=images has no splits (every image under --data_dir is embedded)")
  _checks(f, [("max_images", f.max_images >= 0, "must be >= 0 (0: all)"),
              ("batch_size", f.batch_size >= 1, "must be >= 1"),
              ("k", f.k >= 1, "must be >= 1"),
              ("max_image_pixels", f.max_image_pixels >= 1, "must be >= 1")])
  data = eval_data_from_flags(f)
  split = "all" if images else f.split
  workdir = f.output_dir or os.path.join(
      _parent_of(f.encoder), f"embed_{f.dataset.replace('/', '_')}_{split}")
  return EmbedConfig(encoder=f.encoder, workdir=workdir, data=data, split=split,
                     max_images=f.max_images, batch_size=f.batch_size, sprite=f.sprite,
                     query=tuple(f.query), k=f.k)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  workdir: str
  export_dir: str
  checkpoint: str = ""
  overwrite: bool = False


def export_from_flags(f):
  return ExportConfig(workdir=f.workdir, export_dir=f.export_dir,
                      checkpoint=f.checkpoint or "", overwrite=f.overwrite)


def as_dict(config):
  """A downstream config as a JSON-able dict (what the workdir's config.json holds)."""
  return _normalise(dataclasses.asdict(config))


def resume_settings(values, keys):
  """The settings named by `keys` ("name" or "section.name") of a config dict, by
  their flag names: what a resume must not change."""
  flat = {}
  for key in keys:
    section, _, name = key.rpartition(".")
    holder = values.get(section, {}) if section else values
    if name in holder:
      flat[name] = holder[name]
  return flat
