"""Every command-line flag of the pretraining job, defined in one function.

Only entry points call `define_flags()`; library code takes config objects.
Defaults are the CIFAR-10 setting of the paper except where a flagfile says otherwise.
"""

import os
import sys

from absl import flags

# Flags whose values are written into the workdir's resolved flagfile.
_DEFINED = []
# Where the pretraining flags are defined: absl's FLAGS, or a private FlagValues
# while `defaults()` reads them.
_TARGET = [flags.FLAGS]


def _track(define, name, *args, **kwargs):
  define(name, *args, flag_values=_TARGET[0], **kwargs)
  if name not in _DEFINED:
    _DEFINED.append(name)


def defaults():
  """{flag name: default} of every pretraining flag, without touching absl's FLAGS
  (the Python API's `pretrain` starts from these)."""
  values = flags.FlagValues()
  _TARGET[0] = values
  try:
    define_flags()
  finally:
    _TARGET[0] = flags.FLAGS
  return {name: values[name].default for name in values}


def define_data_flags():
  """The data-set flags shared by training and the evaluation commands."""
  if "dataset" in _TARGET[0]:
    return
  f = flags
  # Data.
  _track(f.DEFINE_string, "dataset", "digits",
         "'digits' (embedded default), a tensorflow-datasets name (cifar10, cifar100, ...), "
         "'folder' (a labelled image folder under --data_dir) or 'images' (your own "
         "unlabeled images: any tree of image files under --data_dir, or a text file of "
         "paths).")
  _track(f.DEFINE_string, "data_dir", "",
         "With --dataset=folder: directory holding <train_split>/<class>/<image> and "
         "<test_split>/<class>/<image>. With --dataset=images: a directory (images in "
         "any nesting of folders) or a text file with one image path per line "
         "(relative to the file's folder).")
  _track(f.DEFINE_string, "tfds_data_dir", "", "tensorflow-datasets data_dir.")
  _track(f.DEFINE_bool, "tfds_download", True,
         "Download and prepare a tfds data set that is not prepared yet, after a quick "
         "check that the network answers (--notfds_download: never download).")
  _track(f.DEFINE_string, "train_split", "train", "Split (or sub-folder) to pretrain on.")
  _track(f.DEFINE_string, "test_split", "test", "Split (or sub-folder) for the probe's test.")
  _track(f.DEFINE_integer, "image_size", 32, "Training crop size.")
  _track(f.DEFINE_enum, "image_check", "header", ["none", "header", "full"],
         "With --dataset=folder, how every file is checked before training: none "
         "(extension and size), header (format, size, truncation; the default), full "
         "(decode every image: slow on large sets).")
  _track(f.DEFINE_enum, "bad_images", "skip", ["skip", "error"],
         "With --dataset=folder: skip bad files (counted in the log and in "
         "data_report.json) or stop at the first, naming it.")
  _track(f.DEFINE_integer, "max_image_pixels", 50_000_000,
         "With --dataset=folder: images with more pixels are skipped as too large.")


def define_flags():
  """Every flag of the pretraining command, in groups."""
  if "depth" in _TARGET[0]:
    return
  define_data_flags()
  _define_input_and_augmentation_flags()
  _define_model_and_loss_flags()
  _define_optimisation_flags()
  _define_run_flags()
  _define_monitoring_flags()


def _define_input_and_augmentation_flags():
  f = flags
  _track(f.DEFINE_string, "normalization", "auto",
         "Per-channel mean/std: auto (by data set), cifar10, cifar100, imagenet, digits.")
  _track(f.DEFINE_bool, "cache", False, "Cache decoded images of an image folder in memory.")
  _track(f.DEFINE_integer, "shuffle_buffer", 10000, "Shuffle buffer, in images.")
  _track(f.DEFINE_string, "data_service", "",
         "grpc://host:port of a tf.data service dispatcher: its workers read, decode and "
         "augment the training images (--dataset=folder or images, at the same paths on "
         "every worker host); see README, 'Feeding training from a tf.data service'.")
  # Augmentation.
  _track(f.DEFINE_float, "crop_min_scale", 0.08, "Random resized crop: smallest area share.")
  _track(f.DEFINE_float, "hflip_prob", 0.5, "Horizontal flip probability.")
  _track(f.DEFINE_float, "jitter_prob", 0.8, "Colour jitter probability.")
  _track(f.DEFINE_float, "brightness", 0.4, "Colour jitter brightness strength.")
  _track(f.DEFINE_float, "contrast", 0.4, "Colour jitter contrast strength.")
  _track(f.DEFINE_float, "saturation", 0.2, "Colour jitter saturation strength.")
  _track(f.DEFINE_float, "hue", 0.1, "Colour jitter hue strength.")
  _track(f.DEFINE_float, "grayscale_prob", 0.2, "Grayscale probability.")
  _track(f.DEFINE_list, "blur_prob", ["1.0", "0.1"],
         "Gaussian blur probability: one value, or view1,view2.")
  _track(f.DEFINE_list, "solarize_prob", ["0.0", "0.2"],
         "Solarisation probability: one value, or view1,view2.")


def _define_model_and_loss_flags():
  f = flags
  _track(f.DEFINE_string, "backbone", "resnet",
         "The encoder: resnet (our ResNet of --depth, --stem, --width), resnet18, "
         "resnet34, resnet50, or a keras-hub preset with its weights (a preset "
         "directory, an export of ours, or a name keras-hub fetches, such as "
         "vit_base_patch16_224_imagenet): continued pretraining on your data.")
  _track(f.DEFINE_string, "backbone_config", "",
         "A JSON file of any keras-hub or Keras backbone, as "
         "keras.saving.serialize_keras_object writes it (new random weights).")
  _track(f.DEFINE_integer, "depth", 18, "ResNet depth: 18, 34 or 50.")
  _track(f.DEFINE_string, "stem", "cifar", "ResNet stem: cifar or imagenet.")
  _track(f.DEFINE_integer, "width", 64, "Filters of the first ResNet stage (64 standard).")
  _track(f.DEFINE_string, "projector", "2048-2048-64", "Projector widths, last = D.")
  _track(f.DEFINE_bool, "projector_bn", False, "BatchNorm in the projector's hidden layers.")
  _track(f.DEFINE_bool, "l2_normalize", True, "L2-normalise projector outputs.")
  _track(f.DEFINE_bool, "sync_bn", True,
         "Synchronise BatchNorm across replicas (only when there are several).")
  # Loss.
  _track(f.DEFINE_float, "alpha", 250.0, "Attraction weight.")
  _track(f.DEFINE_float, "cov_weight", 1.0, "Covariance (big-bang) term weight.")
  _track(f.DEFINE_float, "la_R", 0.01, "Covariance forgetting factor, in [0, 1).")
  _track(f.DEFINE_float, "la_mu", 0.01, "Mean forgetting factor, in [0, 1).")
  _track(f.DEFINE_float, "eps", 1e-8, "Diagonal perturbation of R in the log-determinant.")
  _track(f.DEFINE_float, "R_ini", 1.0, "R starts as R_ini * I.")
  _track(f.DEFINE_enum, "covariance", "per_branch", ["per_branch", "shared"],
         "One (mu, R) per view, or one over both views.")


def _define_optimisation_flags():
  f = flags
  _track(f.DEFINE_float, "lr", 0.5, "Base learning rate (for the global batch).")
  _track(f.DEFINE_float, "momentum", 0.9, "SGD momentum.")
  _track(f.DEFINE_float, "weight_decay", 1e-4, "Coupled L2 weight decay (PyTorch SGD).")
  _track(f.DEFINE_integer, "warmup_epochs", 10, "Linear warm-up epochs.")
  _track(f.DEFINE_float, "warmup_start_lr", 3e-3, "Learning rate at step 0.")
  _track(f.DEFINE_float, "min_lr", 1e-6, "Learning rate at the end of the cosine.")


def _define_run_flags():
  """Workdir, length, seed, devices, checkpoints, guards, determinism, speed."""
  f = flags
  _track(f.DEFINE_string, "workdir", "runs/default",
         "Checkpoints, TensorBoard logs, resolved flags and summary.json go here.")
  _track(f.DEFINE_integer, "epochs", 1000, "Pretraining epochs.")
  _track(f.DEFINE_integer, "batch_size", 512, "Global batch size (all replicas).")
  _track(f.DEFINE_integer, "steps_per_epoch", 0,
         "Steps per epoch; 0 = training images // batch size.")
  _track(f.DEFINE_integer, "seed", 0, "Seed of weights, data order and augmentation.")
  _track(f.DEFINE_string, "strategy", "default",
         "default (one device), mirrored (all local GPUs, or --num_cpu_devices CPUs), "
         "multi_worker (TF_CONFIG).")
  _track(f.DEFINE_enum, "cluster_resolver", "tf_config", ["tf_config", "slurm"],
         "With --strategy=multi_worker: the cluster from TF_CONFIG, or from SLURM's "
         "variables (every task started by srun).")
  _track(f.DEFINE_integer, "slurm_port_base", 8888,
         "With --cluster_resolver=slurm: first port of the workers' servers.")
  _track(f.DEFINE_integer, "num_cpu_devices", 0,
         "With --strategy=mirrored and no GPU: split the CPU into this many devices.")
  _track(f.DEFINE_integer, "keep_checkpoints", 3, "Checkpoints kept in the workdir.")
  _track(f.DEFINE_bool, "export", False,
         "After training, export the encoder (SavedModel + keras-hub preset) to "
         "--export_dir and check it reloads (as `corinfomax export` does).")
  _track(f.DEFINE_string, "export_dir", "",
         "With --export: the export's path (a link to the newest step); empty: "
         "<workdir>/export.")
  _track(f.DEFINE_float, "loss_spike_factor", 0.0,
         "Stop, keeping the last checkpoint, when a step's loss exceeds this many times "
         "the median of the previous --loss_spike_window steps (0: off).")
  _track(f.DEFINE_integer, "loss_spike_window", 50,
         "Steps whose median loss the spike guard compares against.")
  _track(f.DEFINE_bool, "deterministic", False,
         "Deterministic ops (tf.config.experimental.enable_op_determinism) and a fixed "
         "data order: two runs give bitwise-equal weights on the CPU.")
  _track(f.DEFINE_bool, "jit_compile", False, "Compile the training step with XLA.")
  _track(f.DEFINE_string, "mixed_precision", "none", "none, float16 or bfloat16.")


def _define_monitoring_flags():
  """Logs, probes, kNN, spectra, the augmentation preview, the console."""
  f = flags
  _track(f.DEFINE_integer, "log_every_steps", 10, "TensorBoard scalar interval, in steps.")
  _track(f.DEFINE_string, "eval_dataset", "",
         "The labelled set the end-of-training probe and the kNN monitor use ('digits', "
         "'folder' or a tensorflow-datasets name; empty: the training set). Without "
         "one, --dataset=images skips them, saying so.")
  _track(f.DEFINE_string, "eval_data_dir", "",
         "With --eval_dataset=folder: <eval_train_split>/<class>/<image> and "
         "<eval_test_split>/<class>/<image>.")
  _track(f.DEFINE_string, "eval_train_split", "train",
         "--eval_dataset's split the probe trains on.")
  _track(f.DEFINE_string, "eval_test_split", "test",
         "--eval_dataset's split the probe and kNN are measured on.")
  _track(f.DEFINE_integer, "probe_epochs", 100,
         "Epochs of the linear probe after pretraining; 0 skips the probe.")
  _track(f.DEFINE_bool, "probe_random", True,
         "Also probe a randomly initialised encoder of the same architecture.")
  _track(f.DEFINE_bool, "online_probe", False,
         "Train a linear head on stop-gradient features alongside (logs probe_top1).")
  _track(f.DEFINE_float, "online_probe_lr", 0.1, "Learning rate of the online probe.")
  _track(f.DEFINE_integer, "knn_every_epochs", 0,
         "kNN top-1 on the test split every N epochs (0: off).")
  _track(f.DEFINE_list, "knn_k", ["20", "200"], "Neighbour counts of the kNN monitor.")
  _track(f.DEFINE_float, "knn_temperature", 0.07, "Temperature of the kNN votes.")
  _track(f.DEFINE_integer, "monitor_every_steps", 50,
         "Covariance spectra, effective rank, LDMI and collapse checks every N steps "
         "(0: off).")
  _track(f.DEFINE_float, "collapse_rank_share", 0.1,
         "Warn of dimensional collapse when the effective rank of R falls below this "
         "share of D.")
  _track(f.DEFINE_integer, "preview_images", 8,
         "Images in the augmentation preview written at the start of training (0: off).")
  _track(f.DEFINE_bool, "preview_only", False,
         "Write the augmentation preview (TensorBoard and preview.png) and exit.")
  _track(f.DEFINE_string, "verbose", "auto",
         "Keras fit verbosity: auto (progress bar on a terminal, a line per epoch "
         "otherwise), 0, 1 or 2.")


def define_encoder_flag(help_text):
  flags.DEFINE_string("encoder", None, help_text)


def define_lifecycle_flags(keep_checkpoints=2, seed_help="Seed of the head, data order "
                           "and augmentation."):
  """The flags of every downstream command that trains: checkpoints kept, seed,
  deterministic ops."""
  flags.DEFINE_integer("keep_checkpoints", keep_checkpoints, "Checkpoints kept.")
  flags.DEFINE_integer("seed", 0, seed_help)
  flags.DEFINE_bool("deterministic", False,
                    "Deterministic ops (tf.config.experimental.enable_op_determinism): "
                    "a rerun, or a killed run resumed, gives bitwise-equal weights on "
                    "the CPU.")


def resolved_flagfile(flag_values):
  """The values of every flag above, as flagfile text (one --name=value a line)."""
  lines = ["# Resolved flags of this run; rerun with --flagfile=<this file>."]
  for name in _DEFINED:
    flag = flag_values[name]
    value = flag.value
    if isinstance(value, list):
      value = ",".join(str(v) for v in value)
    if isinstance(value, bool):
      lines.append(f"--{name}" if value else f"--no{name}")
    else:
      lines.append(f"--{name}={value}")
  return "\n".join(lines) + "\n"


def exit_with_error(message, code=2):
  """A flag-parsing error as one line (before any command runs): `error: <message>`
  on stderr, exit status 2. Later errors are `errors.UserError`s (see cli.runner)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _flag_assignments(path, seen=()):
  """[(flag name, value, 'file:line')] of a flagfile, nested flagfiles expanded."""
  if path in seen or not os.path.isfile(path):
    return []  # absl itself reports missing files and loops
  out = []
  with open(path) as fh:
    for number, line in enumerate(fh, 1):
      line = line.strip()
      if not line.startswith("--"):
        continue  # blank lines and comments (# or //)
      name, has_value, value = line[2:].partition("=")
      if name == "flagfile":
        out.extend(_flag_assignments(value, seen + (path,)))
        continue
      if not has_value:
        # --name is name=true, --noname is name=false when --name is a boolean.
        if name.startswith("no") and name[2:] in flags.FLAGS:
          name, value = name[2:], "false"
        else:
          value = "true"
      out.append((name, value, f"{path}:{number}"))
  return out


def flagfile_contradiction(argv):
  """A flag set to two different values inside one --flagfile (nested ones included).

  The command line overriding a flagfile is the intended use and is allowed; one
  file that says both --batch_size=256 and --batch_size=512 is a mistake that absl
  would resolve silently (the last wins).
  """
  for arg in argv[1:]:
    if not arg.startswith("--flagfile="):
      continue
    first = {}
    for name, value, where in _flag_assignments(arg.split("=", 1)[1]):
      if name in first and first[name][0] != value:
        return (f"--flagfile={arg.split('=', 1)[1]}: --{name} is set to "
                f"{first[name][0]!r} at {first[name][1]} and to {value!r} at {where}; "
                "keep one")
      first.setdefault(name, (value, where))
  return None


def packaged_flagfile(path):
  """`path` itself, or, when no such file exists and `path` names one of the flagfiles
  shipped in the package (`configs/<name>.cfg`), the shipped one: the README's
  commands work from any directory once the package is installed."""
  if os.path.exists(path):
    return path
  shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                         os.path.basename(path))
  if os.path.normpath(os.path.dirname(path)) == "configs" and os.path.isfile(shipped):
    return shipped
  return path


def _resolve_flagfiles(argv):
  return [("--flagfile=" + packaged_flagfile(arg.split("=", 1)[1])
           if arg.startswith("--flagfile=") else arg) for arg in argv]


def parse_flags(argv):
  """absl's parser, with contradictions and parsing errors as one line naming the flag."""
  argv = _resolve_flagfiles(argv)
  contradiction = flagfile_contradiction(argv)
  if contradiction:
    exit_with_error(contradiction)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    exit_with_error(f"{e}; see --helpfull")
