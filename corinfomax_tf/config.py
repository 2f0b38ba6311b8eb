"""Frozen configuration objects, built from flags at the edge and validated.

Each setting is a dataclass field declared with `setting(default, help, choices,
check)`: the command-line flag of the same name is derived from it
(`flags.define_config_flags`) and its range check runs when the config is built
(`validate_fields`), so a default, its help and its check live in one place. Checks
that involve several flags stay in the `*_from_flags` functions.

Library code takes these (or plain arguments), never FLAGS. The `*_from_flags`
functions are the only places that read absl flags (or any namespace); every
validation error is an errors.ConfigError whose message names the flag and the value
received.
"""

import dataclasses
import json
import os
import re
import sys
import types

from corinfomax_tf import errors
from corinfomax_tf.data import views
from corinfomax_tf.method import loss_args
from corinfomax_tf.models import specs
from corinfomax_tf.tuning import space as space_lib

NORMALIZATIONS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Measured on the digits training split at 16x16 (grey, so equal channels).
    "digits": ((0.309, 0.309, 0.309), (0.349, 0.349, 0.349)),
}
STRATEGIES = ("default", "mirrored", "multi_worker")


def setting(default, help, choices=None, check=None, kind=None):  # noqa: A002
  """A config field that is also a command-line flag of the same name: its default,
  help, choices and validation live here; `flags.define_config_flags` derives the
  flag, `validate_fields` applies `check` (">= 1", "> 0", "in [0, 1)", ..., with an
  optional "; note" shown in parentheses) naming the flag."""
  metadata = {"help": help}
  if kind is not None:   # the flag's type where the default (None) does not say it
    metadata["kind"] = kind
  if choices:
    metadata["choices"] = tuple(choices)
  if check:
    _rule(check)  # a typo in a rule fails at import, not at a user's bad value
    metadata["check"] = check
  return dataclasses.field(default=default, metadata=metadata)


_COMPARE = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b}


def _rule(check):
  """">= 1; note" -> (predicate, "must be >= 1 (note)")."""
  rule, _, note = check.partition("; ")
  requirement = f"must be {rule}" + (f" ({note})" if note else "")
  m = re.fullmatch(r"(>=|>) (-?[\d.e-]+)", rule)
  if m:
    op, bound = m.group(1), float(m.group(2))
    return (lambda v: _COMPARE[op](v, bound)), requirement
  m = re.fullmatch(r"in ([\[(])(-?[\d.]+), (-?[\d.]+)([\])])", rule)
  if not m:
    raise ValueError(f"Unknown check {check!r}")
  left, lo, hi, right = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)

  def inside(v):
    return ((lo <= v) if left == "[" else (lo < v)) and ((v <= hi) if right == "]"
                                                          else (v < hi))
  return inside, requirement


def validate_fields(cls, values, names=None, skip=()):
  """The first field of `cls` (or of `names`) whose `check` the value in `values`
  (flags or any namespace) fails, as a ConfigError naming the flag."""
  for field in dataclasses.fields(cls):
    check = field.metadata.get("check")
    if not check or field.name in skip or (names is not None and field.name not in names):
      continue
    ok, requirement = _rule(check)
    value = getattr(values, field.name)
    _check(ok(value), field.name, value, requirement)


MIXED_PRECISION = ("none", "float16", "bfloat16")
BACKENDS = ("tensorflow", "jax")


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
  image_size: int = setting(32, 'Training crop size.', check='>= 8')
  mean: tuple = NORMALIZATIONS["digits"][0]
  std: tuple = NORMALIZATIONS["digits"][1]
  cache: bool = setting(False, 'Cache decoded images of an image folder in memory.')
  shuffle_buffer: int = setting(10000, 'Shuffle buffer, in images.')
  data_service: str = setting(
      "",
      'grpc://host:port of a tf.data service dispatcher: its workers read, decode and'
      ' augment the training images (--dataset=folder or images, at the same paths on'
      " every worker host); see docs/distributed.md, 'Feeding training from a tf.data service'.")
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
      'With --dataset=folder: images with more pixels are skipped as too large.', check='>= 1')
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
  view1: views.ViewConfig = views.ViewConfig(blur_prob=1.0, solarize_prob=0.0)
  view2: views.ViewConfig = views.ViewConfig(blur_prob=0.1, solarize_prob=0.2)


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
  width: int = setting(64, 'Filters of the first ResNet stage (64 standard).', check='>= 1')
  projector: str = setting("2048-2048-64", 'Projector widths, last = D.')
  projector_bn: bool = setting(False, "BatchNorm in the projector's hidden layers.")
  l2_normalize: bool = setting(True, 'L2-normalise projector outputs.')
  sync_bn: bool = setting(
      True,
      'Synchronise BatchNorm across replicas (only when there are several).')
  fused_batch_norm: bool = setting(
      False,
      "Our ResNet's BatchNorm as one fused TensorFlow op in training (oneDNN's or "
      "cuDNN's kernel): a faster step (1.22-1.35x on a 2-core Intel Xeon with AVX-512, "
      "docs/benchmarks.md), not bitwise the default step that equals the authors' "
      "(sums in another order).")


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
  lr: float = setting(0.5, 'Base learning rate (for the global batch).', check='> 0')
  momentum: float = setting(0.9, 'SGD momentum.', check='in [0, 1)')
  weight_decay: float = setting(1e-4, 'Coupled L2 weight decay (PyTorch SGD).', check='>= 0')
  warmup_epochs: int = setting(10, 'Linear warm-up epochs.', check='>= 0')
  warmup_start_lr: float = setting(3e-3, 'Learning rate at step 0.')
  min_lr: float = setting(1e-6, 'Learning rate at the end of the cosine.', check='>= 0')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  workdir: str = setting(
      "runs/default",
      'Checkpoints, TensorBoard logs, resolved flags and summary.json go here.')
  epochs: int = setting(1000, 'Pretraining epochs.', check='>= 1')
  batch_size: int = setting(512, 'Global batch size (all replicas).', check='>= 2; covariance of a batch')
  steps_per_epoch: int = setting(
      0,
      'Steps per epoch; 0 = training images // batch size.', check='>= 0')
  seed: int = setting(0, 'Seed of weights, data order and augmentation.')
  strategy: str = setting(
      "default",
      'default (one device), mirrored (all local GPUs, or --num_cpu_devices CPUs), '
      'multi_worker (TF_CONFIG).')
  num_cpu_devices: int = setting(
      0,
      'With --strategy=mirrored and no GPU: split the CPU into this many devices.', check='>= 0')
  cluster_resolver: str = setting(
      "tf_config",
      'With --strategy=multi_worker: the cluster from TF_CONFIG, '
      "or from SLURM's variables (every task started by srun).", choices=('tf_config', 'slurm'))
  slurm_port_base: int = setting(
      8888,
      "With --cluster_resolver=slurm: first port of the workers' servers.")
  extend_epochs: tuple = setting(
      (),
      'Train a finished (or running) workdir longer: phases of N more epochs each, '
      'N or N@LR. A phase follows a cosine from LR down to --min_lr; without @LR it '
      'stays at --min_lr, where the schedule ends. Rerun with the '
      'same list to resume; append a phase to train longer again. See '
      "docs/training.md, 'Training longer'.")
  keep_checkpoints: int = setting(3, 'Checkpoints kept in the workdir.', check='>= 1')
  export_runtimes: bool = setting(
      True, 'With --export: also encoder.onnx and encoder.tflite, each checked by its '
      'runtime (the export command: --onnx, --litert).')
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
      'Steps whose median loss the spike guard compares against.', check='>= 5')
  log_every_steps: int = setting(10, 'TensorBoard scalar interval, in steps.', check='>= 1')
  probe_epochs: int = setting(
      100,
      'Epochs of the linear probe after pretraining; 0 skips the probe.', check='>= 0')
  probe_random: bool = setting(
      True,
      'Also probe a randomly initialised encoder of the same architecture.')
  online_probe: bool = setting(
      False,
      'Train a linear head on stop-gradient features alongside (logs probe_top1).')
  online_probe_lr: float = setting(0.1, 'Learning rate of the online probe.', check='> 0')
  knn_every_epochs: int = setting(
      0,
      'kNN top-1 on the test split every N epochs (0: off).', check='>= 0')
  knn_k: tuple = setting((20, 200), 'Neighbour counts of the kNN monitor.')
  knn_temperature: float = setting(0.07, 'Temperature of the kNN votes.', check='> 0')
  monitor_every_steps: int = setting(
      50,
      'Covariance spectra, effective rank, LDMI and collapse checks every N steps (0:'
      ' off).', check='>= 0')
  collapse_rank_share: float = setting(
      0.1,
      'Warn of dimensional collapse when the effective rank of R falls below this '
      'share of D.', check='in [0, 1]')
  preview_images: int = setting(
      8,
      'Images in the augmentation preview written at the start of training (0: off).', check='>= 0')
  preview_only: bool = setting(
      False,
      'Write the augmentation preview (TensorBoard and preview.png) and exit.')
  deterministic: bool = setting(
      False,
      'Deterministic ops (tf.config.experimental.enable_op_determinism) and a fixed '
      'data order: two runs give bitwise-equal weights on the CPU.')
  jit_compile: bool = setting(
      None,
      'Compile the training step with XLA: --jit_compile or --nojit_compile; not given, '
      'a run of at least 500 steps times both steps once on this machine and takes the '
      'faster (remembered per machine and in the workdir; docs/training.md, "XLA").',
      kind=bool)
  mixed_precision: str = setting("none", 'none, float16 or bfloat16.')
  backend: str = setting(
      "",
      "Keras backend of the training: tensorflow or jax (docs/backends.md); empty: "
      "KERAS_BACKEND, else tensorflow. A workdir keeps the backend it started on.")
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
      view1=views.ViewConfig(blur_prob=blur[0], solarize_prob=solarize[0], **common),
      view2=views.ViewConfig(blur_prob=blur[1], solarize_prob=solarize[1], **common))


def _from_flags(cls, f, **computed):
  """A config section whose fields are flags of the same names (`computed`: the
  fields that are not plain flag values)."""
  validate_fields(cls, f, skip=computed)
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
  mean, std = _normalization(f.normalization, f.dataset)
  data = _from_flags(DataConfig, f, mean=mean, std=std)
  _data_dir_checks(f)
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
  computed = {}
  if f.backbone_config:
    _check(f.backbone == "resnet", "backbone_config", f.backbone_config,
           f"and --backbone={f.backbone} name two backbones; keep one")
    specs.read_backbone_config(f.backbone_config)   # one line naming the file
  elif specs.is_resnet(f.backbone) and specs.RESNETS[f.backbone]:
    depth = specs.RESNETS[f.backbone]
    _check(not _given(f, "depth") or f.depth == depth, "depth", f.depth,
           f"contradicts --backbone={f.backbone}; keep one")
    computed["depth"] = depth
  elif not specs.is_resnet(f.backbone):
    _check(bool(f.backbone.strip()), "backbone", "''",
           "must name a backbone: resnet18, resnet34, resnet50 or a keras-hub preset")
  _check(not f.fused_batch_norm or (specs.is_resnet(f.backbone) and not f.backbone_config),
         "fused_batch_norm", True,
         "applies to our ResNet's BatchNorm (--backbone=resnet, resnet18/34/50), not to "
         f"{f.backbone_config or f.backbone}")
  depth = computed.get("depth", f.depth)
  _check(depth in specs.BLOCKS, "depth", f.depth, f"must be one of {sorted(specs.BLOCKS)}")
  _check(f.stem in specs.STEMS, "stem", f.stem, f"must be one of {specs.STEMS}")
  try:
    widths = specs.parse_projector_spec(f.projector)
  except ValueError:
    raise errors.ConfigError(f"--projector={f.projector}: must be positive integers joined "
                             "by '-', such as 2048-2048-64") from None
  return _from_flags(ModelConfig, f, **computed), widths[-1]


def _loss_section(f, dim):
  loss = _from_flags(LossConfig, f)
  try:
    loss_args.validate_loss_args(dim=dim, **dataclasses.asdict(loss))
  except ValueError as e:
    # "la_R must be in [0, 1). Received: la_R=1.5" -> "--la_R=1.5: must be in [0, 1)"
    message = str(e)
    name = message.split(" ", 1)[0]
    value = getattr(f, name, None)
    reason = message.split(". Received")[0].split(" ", 1)[1]
    raise errors.ConfigError(f"--{name}={value}: {reason}") from None
  return loss


def _optim_section(f):
  return _from_flags(OptimConfig, f)


def _train_section(f):
  _check(bool(f.workdir), "workdir", "''", "must name a directory")
  _checks(f, [
      ("strategy", f.strategy in STRATEGIES, f"must be one of {STRATEGIES}"),
      ("cluster_resolver", f.cluster_resolver == "tf_config" or
       f.strategy == "multi_worker",
       f"is read only with --strategy=multi_worker (--strategy={f.strategy})"),
      ("num_cpu_devices", f.num_cpu_devices == 0 or f.strategy == "mirrored",
       f"is read only with --strategy=mirrored (--strategy={f.strategy})"),
      ("loss_spike_factor", f.loss_spike_factor == 0 or f.loss_spike_factor > 1,
       "must be 0 (off) or > 1"),
      ("online_probe", not f.online_probe or f.dataset != "images",
       "trains on the training images' labels, and --dataset=images has none "
       "(the end-of-training probe and --knn_every_epochs use --eval_dataset)")])
  knn_k = _positive_ints(f.knn_k, "knn_k")
  _checks(f, [
      ("mixed_precision", f.mixed_precision in MIXED_PRECISION,
       f"must be one of {MIXED_PRECISION}"),
      ("verbose", f.verbose in ("auto", "0", "1", "2"), "must be auto, 0, 1 or 2")])
  extend = tuple(str(v).strip() for v in f.extend_epochs if str(v).strip())
  extension_phases(extend)   # one line naming the flag on a bad phase
  backend = _backend(f)
  return _from_flags(TrainConfig, f, knn_k=knn_k, extend_epochs=extend, backend=backend)


def _backend(f):
  """--backend, else KERAS_BACKEND, else that of a Keras already imported (the Python
  API), else tensorflow; what JAX cannot do yet is one line."""
  keras = sys.modules.get("keras")
  imported = keras.backend.backend() if hasattr(keras, "backend") else None
  backend = f.backend or os.environ.get("KERAS_BACKEND") or imported or "tensorflow"
  where = f"--backend={backend}" if f.backend else f"KERAS_BACKEND={backend}"
  if backend not in BACKENDS:
    raise errors.ConfigError(f"{where}: must be one of {BACKENDS} (PyTorch does not train "
                             "CorInfoMax yet: docs/backends.md)")
  if backend == "jax":
    _checks(f, [
        ("strategy", f.strategy != "multi_worker",
         f"several hosts train on --backend=tensorflow only ({where})"),
        ("mixed_precision", f.mixed_precision != "float16",
         f"float16 loss scaling trains on --backend=tensorflow only; bfloat16 trains on "
         f"JAX ({where})"),
        ("online_probe", not f.online_probe,
         f"the online probe trains on --backend=tensorflow only; the end-of-training "
         f"probe and --knn_every_epochs run on JAX ({where})"),
        ("data_service", not f.data_service,
         f"the tf.data service feeds --backend=tensorflow only ({where})"),
        ("fused_batch_norm", not f.fused_batch_norm,
         f"TensorFlow's fused kernel; on JAX the step is compiled whole by XLA, which "
         f"fuses BatchNorm's operations itself ({where})")])
  return backend


def extension_phases(extend_epochs):
  """--extend_epochs values ("N" or "N@LR") -> [(epochs, start rate or None)]."""
  phases = []
  for text in extend_epochs:
    epochs, at, lr = str(text).partition("@")
    try:
      phase = (int(epochs), float(lr) if at else None)
    except ValueError:
      phase = (0, None)
    _check(phase[0] >= 1 and (phase[1] is None or phase[1] > 0), "extend_epochs",
           ",".join(map(str, extend_epochs)),
           f"{text!r} is not N or N@LR (N >= 1 more epochs, LR > 0 the rate they start at)")
    phases.append(phase)
  return phases


def _normalization_name(mean, std):
  for name, (m, s) in NORMALIZATIONS.items():
    if tuple(m) == tuple(mean) and tuple(s) == tuple(std):
      return name
  return f"mean {list(mean)}, std {list(std)}"


def pretraining_resume_settings(cfg):
  """What a resumed pretraining run must keep, by flag name: the data and its order,
  image size and views, model, loss, optimisation and schedule, length, global batch
  and seed. (Where the images are, how they are checked, logging, monitors, the
  number of replicas and the export may change.)"""
  d, v1, v2 = cfg.data, cfg.augment.view1, cfg.augment.view2
  settings = {"dataset": d.dataset, "train_split": d.train_split,
              "image_size": d.image_size,
              "normalization": _normalization_name(d.mean, d.std),
              "shuffle_buffer": d.shuffle_buffer,
              "crop_min_scale": v1.crop_scale[0], "blur_prob": [v1.blur_prob, v2.blur_prob],
              "solarize_prob": [v1.solarize_prob, v2.solarize_prob]}
  for name in ("hflip_prob", "jitter_prob", "brightness", "contrast", "saturation", "hue",
               "grayscale_prob"):
    settings[name] = getattr(v1, name)
  for section in (cfg.model, cfg.loss, cfg.optim):
    settings.update(dataclasses.asdict(section))
  # The backbone's architecture is compared by itself (architecture.json): its
  # preset or config file may move.
  for name in ("backbone", "backbone_config", "sync_bn"):
    settings.pop(name)
  t = cfg.train
  settings.update(epochs=t.epochs, batch_size=t.batch_size,
                  steps_per_epoch=t.steps_per_epoch, seed=t.seed,
                  online_probe=t.online_probe, online_probe_lr=t.online_probe_lr,
                  mixed_precision=t.mixed_precision, extend_epochs=list(t.extend_epochs),
                  backend=t.backend)
  return _normalise(settings)


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
  validate_fields(DataConfig, f, names=("max_image_pixels",))
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
  num_classes: int = setting(0, "Expected class count (0: the data set's).", check='>= 0')
  epochs: int = setting(100, 'Epochs of the linear classifier.', check='>= 1')
  batch_size: int = setting(256, 'Batch size.', check='>= 1')
  lr: float = setting(0.2, 'Base learning rate.', check='> 0')
  min_lr: float = setting(2e-3, 'Final learning rate of the cosine schedule.', check='>= 0')
  schedule: str = setting(
      "cosine",
      'cosine (lr -> min_lr) or step (divide by 10 every --step_epochs).', choices=('cosine', 'step'))
  step_epochs: int = setting(20, 'Step schedule: epochs between decays.', check='>= 1')
  momentum: float = setting(0.9, 'SGD momentum.', check='in [0, 1)')
  weight_decay: float = setting(0.0, 'Coupled L2 weight decay.', check='>= 0')
  augment: bool = setting(True, 'Random resized crop + flip on training images.')
  crop_min_scale: float = setting(0.08, 'Random resized crop: smallest area share.', check='in (0, 1]')
  precompute_features: bool = setting(
      False,
      'Compute training features once (requires --noaugment).')
  eval_every_epochs: int = setting(10, 'Test-split evaluation interval.', check='>= 1')
  keep_checkpoints: int = setting(2, 'Checkpoints kept.', check='>= 1')
  seed: int = setting(0, 'Seed of the head, data order and augmentation.')
  deterministic: bool = setting(
      False,
      'Deterministic ops (tf.config.experimental.enable_op_determinism): a rerun, or '
      'a killed run resumed, gives bitwise-equal weights on the CPU.')

  # Settings whose change makes a checkpoint of this workdir the wrong one.
  RESUME_KEYS = ("encoder", *_DATA_RESUME_KEYS, "batch_size", "lr", "min_lr",
                 "schedule", "step_epochs", "momentum", "weight_decay", "augment",
                 "precompute_features", "crop_min_scale", "seed")


def linear_eval_from_flags(f):
  _check(not (f.precompute_features and f.augment), "precompute_features", True,
         "requires --noaugment (augmented images give new features every epoch)")
  return _from_flags(
      LinearEvalConfig, f, encoder=f.encoder, data=eval_data_from_flags(f),
      workdir=f.workdir or os.path.join(_parent_of(f.encoder), "linear_eval"))


@dataclasses.dataclass(frozen=True)
class KnnEvalConfig:
  encoder: str
  workdir: str
  data: DataConfig
  num_classes: int = setting(0, "Expected class count (0: the data set's).", check='>= 0')
  k: tuple = setting((20, 200), 'Neighbour counts.')
  temperature: float = setting(0.07, 'Vote temperature.', check='> 0')
  runtime: str = setting(
      "tensorflow", 'Runs the encoder with: tensorflow (the SavedModel), or onnx (the '
      "export's encoder.onnx in ONNX Runtime, TensorFlow out of the encoder's loop).",
      choices=("tensorflow", "onnx"))
  validation_fraction: float = setting(
      0.0, "Measure on a seeded held-out share of the train split (the bank: the rest of"
      " it) instead of the test split: a sweep's validation split, as its sweep.json "
      "records it (0: the test split).", check="in [0, 1)")
  validation_seed: int = setting(0, "Seed of the held-out share (--validation_fraction).")


def knn_eval_from_flags(f):
  return _from_flags(
      KnnEvalConfig, f, encoder=f.encoder, data=eval_data_from_flags(f),
      workdir=f.workdir or os.path.join(_parent_of(f.encoder), "knn_eval"),
      k=_positive_ints(f.k, "k"))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  encoder: str
  workdir: str
  data: DataConfig
  init: str = setting(
      "pretrained",
      "Start from the export's weights, or from a random initialisation of the same "
      'architecture (the from-scratch baseline).', choices=('pretrained', 'random'))
  label_fraction: float = setting(
      0.1,
      "Share of each class's training images that keep their label, in (0, 1]; 1 with"
      ' the tfds imagenet2012_subset sets.', check='in (0, 1]')
  subset_seed: int = setting(0, 'Seed of the labelled subset.')
  epochs: int = setting(20, 'Fine-tuning epochs.', check='>= 1')
  batch_size: int = setting(256, 'Batch size.', check='>= 2')
  backbone_lr: float = setting(0.005, 'Learning rate of the encoder.', check='>= 0')
  head_lr: float = setting(10.0, 'Learning rate of the linear head.', check='> 0')
  lr_decay_epochs: tuple = setting((12, 16), 'Epochs at which both rates decay.')
  lr_decay_factor: float = setting(0.2, 'Factor applied at each decay epoch.', check='in (0, 1]')
  momentum: float = setting(0.9, 'SGD momentum.', check='in [0, 1)')
  weight_decay: float = setting(0.0, 'Coupled L2 weight decay.', check='>= 0')
  crop_min_scale: float = setting(0.08, 'Random resized crop: smallest area share.', check='in (0, 1]')
  hflip_prob: float = setting(0.5, 'Horizontal flip probability.', check='in [0, 1]')
  eval_every_epochs: int = setting(5, 'Test-split evaluation interval.', check='>= 1')
  keep_checkpoints: int = setting(2, 'Checkpoints kept.', check='>= 1')
  seed: int = setting(0, 'Seed of the head, data order and augmentation.')
  deterministic: bool = setting(
      False,
      'Deterministic ops (tf.config.experimental.enable_op_determinism): a rerun, or '
      'a killed run resumed, gives bitwise-equal weights on the CPU.')

  # The labelled subset (fraction, seed) is checked by label_subsets, naming its file.
  RESUME_KEYS = ("encoder", *_DATA_RESUME_KEYS, "init", "batch_size", "backbone_lr",
                 "head_lr", "lr_decay_epochs", "lr_decay_factor", "momentum",
                 "weight_decay", "crop_min_scale", "hflip_prob", "seed")


def finetune_from_flags(f):
  decay = _positive_ints(f.lr_decay_epochs, "lr_decay_epochs")
  _check(list(decay) == sorted(decay), "lr_decay_epochs", ",".join(f.lr_decay_epochs),
         "must be increasing positive epochs")
  workdir = f.workdir or os.path.join(_parent_of(f.encoder),
                                      f"finetune_{f.label_fraction:g}_{f.init}")
  return _from_flags(FinetuneConfig, f, encoder=f.encoder, workdir=workdir,
                     data=eval_data_from_flags(f), lr_decay_epochs=decay)


@dataclasses.dataclass(frozen=True)
class DetectionDataConfig:
  dataset: str = setting(
      "generated",
      'generated | coco_json | a tfds detection set (coco/2017).')
  tfds_data_dir: str = setting("", 'tensorflow-datasets data_dir.')
  train_split: str = setting("train", 'tfds training split.')
  test_split: str = setting("validation", 'tfds evaluation split.')
  train_annotations: str = setting("", 'coco_json: training annotation file.')
  train_images: str = setting("", 'coco_json: training image directory.')
  test_annotations: str = setting("", 'coco_json: test annotation file.')
  test_images: str = setting("", 'coco_json: test image directory.')
  num_train_images: int = setting(512, 'generated: training images.', check='>= 1')
  num_test_images: int = setting(128, 'generated: test images.', check='>= 1')
  data_seed: int = setting(0, 'generated: seed of the data set.')
  image_size: int = setting(48, 'Detector input size (square).', check='>= 16')
  max_boxes: int = setting(4, 'Boxes kept per image (padding above).', check='>= 1')


@dataclasses.dataclass(frozen=True)
class DetectConfig:
  encoder: str
  workdir: str
  data: DetectionDataConfig
  init: str = setting(
      "pretrained",
      "The export's encoder weights, or a random initialisation of the same "
      'architecture (the baseline).', choices=('pretrained', 'random'))
  min_level: int = setting(0, 'Lowest pyramid level (0: by stem).')
  max_level: int = setting(0, 'Highest pyramid level (0: by stem).')
  anchor_size: float = setting(
      0.0,
      'Anchor side at level l: anchor_size * 2**l (times 3 scales and 3 aspect '
      "ratios); 0: by stem (4 with the ImageNet stem, as COCO's RetinaNet; 3 with the"
      ' CIFAR stem, whose small objects 4 misses).', check='>= 0; 0: by stem')
  head_convs: int = setting(
      2,
      "Convolutions in each RetinaNet head (4 in the paper's RetinaNet).", check='>= 1')
  epochs: int = setting(12, 'Fine-tuning epochs.', check='>= 1')
  batch_size: int = setting(16, 'Batch size.', check='>= 1')
  lr: float = setting(0.01, 'Peak learning rate (SGD, momentum).', check='> 0')
  warmup_epochs: int = setting(1, 'Linear warm-up epochs.', check='>= 0')
  momentum: float = setting(0.9, 'SGD momentum.')
  weight_decay: float = setting(1e-4, 'Coupled L2 weight decay.')
  clipnorm: float = setting(10.0, 'Global gradient-norm clip (0: off).')
  eval_every_epochs: int = setting(4, 'mAP on the test split every N epochs.', check='>= 1')
  keep_checkpoints: int = setting(2, 'Checkpoints kept.', check='>= 1')
  seed: int = setting(0, 'Seed of the heads and the data order.')
  deterministic: bool = setting(
      False,
      'Deterministic ops (tf.config.experimental.enable_op_determinism): a rerun, or '
      'a killed run resumed, gives bitwise-equal weights on the CPU.')

  RESUME_KEYS = ("encoder", "data.dataset", "data.image_size", "data.num_train_images",
                 "data.data_seed", "data.max_boxes", "init", "min_level", "max_level",
                 "anchor_size", "head_convs", "batch_size", "lr", "warmup_epochs", "momentum",
                 "weight_decay", "clipnorm", "seed")


def detect_from_flags(f):
  if f.dataset == "coco_json":
    for name in ("train_annotations", "train_images", "test_annotations", "test_images"):
      _check(bool(getattr(f, name)), name, "''", "is required with --dataset=coco_json")
  data = _from_flags(DetectionDataConfig, f)
  workdir = f.workdir or os.path.join(_parent_of(f.encoder),
                                      f"detect_{f.dataset.replace('/', '_')}_{f.init}")
  return _from_flags(DetectConfig, f, encoder=f.encoder, workdir=workdir, data=data)


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  encoder: str
  workdir: str
  data: DataConfig              # image_size 0: the encoder's
  split: str = setting(
      "test",
      "The split to embed (a tfds split, a sub-folder of a folder set, digits' train "
      'or test); --dataset=images has none.')
  max_images: int = setting(0, "Embed the split's first N images (0: all).", check='>= 0; 0: all')
  batch_size: int = setting(256, 'Images per encoder call.', check='>= 1')
  sprite: bool = setting(True, 'Thumbnails of the images in the Projector view.')
  query: tuple = setting(
      (),
      'Image files whose nearest neighbours in the set are printed and written to '
      'neighbours.json.')
  k: int = setting(10, 'Neighbours per query.', check='>= 1')
  runtime: str = setting(
      "tensorflow", 'Runs the encoder with: tensorflow (the SavedModel), or onnx (the '
      "export's encoder.onnx in ONNX Runtime, TensorFlow out of the encoder's loop).",
      choices=("tensorflow", "onnx"))

  # What the embeddings are of: a rerun with the same settings reuses them.
  ARRAY_KEYS = ("data.dataset", "data.data_dir", "data.tfds_data_dir",
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
  data = eval_data_from_flags(f)
  split = "all" if images else f.split
  workdir = f.workdir or os.path.join(
      _parent_of(f.encoder), f"embed_{f.dataset.replace('/', '_')}_{split}")
  return _from_flags(EmbedConfig, f, encoder=f.encoder, workdir=workdir, data=data,
                     split=split, query=tuple(f.query))


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  workdir: str
  export_dir: str
  checkpoint: str = setting("", 'A checkpoint prefix; default: the latest.')
  overwrite: bool = setting(False, 'Replace an existing export of the same step.')
  onnx: bool = setting(True, 'Also write encoder.onnx (uint8 pixels in, pooled features '
                       'out; checked with onnxruntime).')
  litert: bool = setting(True, 'Also write encoder.tflite (LiteRT; checked with its '
                         'interpreter).')


def sweep_config(train_values, search, **settings):
  """A validated `config.SweepConfig` from the train flags' values (`train_values`,
  flag name -> value), the `--search` specs and the sweep's own settings by name.
  Every check (the fixed flags, each parameter's range, each sampled flag's bounds)
  runs here, before any trial."""
  from_flags(types.SimpleNamespace(**train_values))
  params = space_lib.parse_all(list(search), train_values)
  for p in params:
    if p.kind == "choice":
      probes = p.choices
    else:
      probes = (p.low, p.high)
    for value in probes:   # each end of the range must be a valid setting
      try:
        from_flags(types.SimpleNamespace(
            **space_lib.apply(train_values, {p.name: value})))
      except errors.ConfigError as e:
        raise errors.ConfigError(f"--search={p.spec()}: {value} is not a valid value "
                                 f"({e})") from None
  fields = {f.name for f in dataclasses.fields(SweepConfig)}
  unknown = sorted(set(settings) - fields)
  if unknown:
    raise ValueError(f"Unknown sweep settings {unknown}. Received: "
                     + ", ".join(f"{k}={settings[k]!r}" for k in unknown))
  values = {f.name: f.default for f in dataclasses.fields(SweepConfig)
            if f.name not in ("workdir", "search", "train")}
  values.update(settings)
  validate_fields(SweepConfig, types.SimpleNamespace(**values),
                  skip=("workdir", "search", "train"))
  workdir = train_values["workdir"]
  return SweepConfig(workdir=workdir, search=tuple(params), train=dict(train_values),
                     **values)


def training_config_path(workdir):
  """`<workdir>/config.json`, or an ExportError naming a workdir that has none (not a
  training workdir). TensorFlow-free: the export command checks before it starts."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise errors.ExportError(f"--workdir={workdir}: no config.json (not a training workdir)")
  return path


def export_from_flags(f):
  if f.workdir:
    training_config_path(f.workdir)
  return _from_flags(ExportConfig, f, checkpoint=f.checkpoint or "")


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


SWEEP_SCORES = ("auto", "knn", "effective_rank")
SWEEP_PRUNERS = ("median", "hyperband", "none")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A hyperparameter sweep: the search space, the study and its storage, the score.
  `train` holds every pretraining flag's value that the trials share (the searched
  ones are overridden per trial); `workdir` is the sweep directory."""
  workdir: str
  search: tuple
  train: dict
  n_trials: int = setting(
      20, 'Trials in the whole study (every host together; finished, pruned and '
      'running trials count, failed ones do not).', check='>= 1')
  study: str = setting(
      "", 'Study name in --storage; hosts running the same command with the same '
      '--study share its trials (empty: the sweep directory\'s name).')
  storage: str = setting(
      "", 'Where the study lives: empty (an SQLite file <workdir>/study.db; nothing to '
      'start), an SQLAlchemy URL many hosts share (postgresql://user@host/db, '
      "mysql://...), or journal:PATH (Optuna's journal file on a shared file system).")
  score: str = setting(
      "auto", 'What a trial is scored on: knn (kNN top-1 on the held-out validation '
      'split; needs labels), effective_rank (of the covariance R, needs no labels), or '
      'auto (knn where there are labels).', choices=SWEEP_SCORES)
  validation_fraction: float = setting(
      0.2, 'Share of the labelled training images held out (seeded) as the '
      'validation split trials are scored on; the test split is measured once, for '
      'the best trial.', check='in [0, 1)')
  validation_seed: int = setting(0, 'Seed of the validation split.')
  pruner: str = setting(
      "median", "Stops unpromising trials early from their per-epoch scores: median "
      "(Optuna's MedianPruner), hyperband, or none.", choices=SWEEP_PRUNERS)
  prune_after_epochs: int = setting(
      1, 'Epochs a trial runs before the pruner may stop it.', check='>= 0')
  pruner_startup_trials: int = setting(
      3, 'Finished trials before the median pruner prunes anything.', check='>= 0')
  startup_trials: int = setting(
      10, "Random trials before TPE models the scores (Optuna's n_startup_trials).",
      check='>= 1')
  sweep_seed: int = setting(
      0, "Seed of the sampler: trial n's suggestions are a function of this seed, n "
      'and the trials before it.')
  prune_collapsed: bool = setting(
      True, "Prune a trial as soon as the health monitor reports a collapse "
      "(its reason recorded); --noprune_collapsed lets it run on.")
  try_given: bool = setting(
      True, "The study's first trial runs the searched parameters' own values (the "
      "flags' values, where they lie in the space): the table compares the given "
      "settings with the sweep's best on the same validation split.")
  test_best: bool = setting(
      True, "When the study is complete, measure the best trial's kNN top-1 on the "
      "test split once (reported apart from the validation scores).")
