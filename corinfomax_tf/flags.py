"""Every command-line flag of the pretraining job, derived from its config fields.

A pretraining setting is a field of a config dataclass (config.py) declared with
`config.setting(default, help)`: the flag of the same name is derived from it, so
its default and help live in one place. Only entry points call `define_flags()`;
library code takes config objects. Defaults are the CIFAR-10 setting of the paper
except where a flagfile says otherwise.
"""

import os
import re
import sys

from absl import flags

# Flags whose values are written into the workdir's resolved flagfile.
_DEFINED = []
# Where the pretraining flags are defined: absl's FLAGS, or a private FlagValues
# while `defaults()` reads them.
_TARGET = [flags.FLAGS]


# Flag name -> the config section it belongs to ("data", "model", ...): how a
# command's --help groups its flags. A flag a command defines itself has none.
GROUPS = {}


def section_title(cls):
  """The --help heading of a config section: DataConfig -> "data",
  KnnEvalConfig -> "knn eval", OptimConfig -> "optimizer"."""
  words = re.findall(r"[A-Z][a-z]*", cls.__name__.removesuffix("Config"))
  title = " ".join(w.lower() for w in words)
  return {"optim": "optimizer", "train": "training"}.get(title, title)


def _track(define, name, *args, group=None, **kwargs):
  define(name, *args, flag_values=_TARGET[0], **kwargs)
  if name not in _DEFINED:
    _DEFINED.append(name)
  if group and _TARGET[0] is flags.FLAGS:
    GROUPS.setdefault(name, group)


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


# The data flags every evaluation command shares with training.
DATA_FLAGS = ("dataset", "data_dir", "tfds_data_dir", "tfds_download", "train_split",
              "test_split", "image_size", "image_check", "bad_images", "max_image_pixels")


def define_config_flags(cls, names=None):
  """A flag for every field of the config dataclass `cls` that is a `setting` (or
  for those in `names`): the field's name, default, help and choices, so that a
  default lives in one place. The flag's type is the default's."""
  import dataclasses
  for field in dataclasses.fields(cls):
    if "help" not in field.metadata or (names is not None and field.name not in names):
      continue
    if field.name in _TARGET[0]:
      continue
    default, help_text = field.default, field.metadata["help"]
    group = section_title(cls)
    if field.metadata.get("choices"):
      _track(flags.DEFINE_enum, field.name, default, list(field.metadata["choices"]),
             help_text, group=group)
    elif isinstance(default, bool) or field.metadata.get("kind") is bool:
      _track(flags.DEFINE_bool, field.name, default, help_text, group=group)
    elif isinstance(default, int):
      _track(flags.DEFINE_integer, field.name, default, help_text, group=group)
    elif isinstance(default, float):
      _track(flags.DEFINE_float, field.name, default, help_text, group=group)
    elif isinstance(default, tuple):
      _track(flags.DEFINE_list, field.name, [str(v) for v in default], help_text,
             group=group)
    else:
      _track(flags.DEFINE_string, field.name, default, help_text, group=group)


def define_data_flags():
  """The data-set flags shared by training and the evaluation commands."""
  from corinfomax_tf import config
  define_config_flags(config.DataConfig, DATA_FLAGS)


def define_flags():
  """Every flag of the pretraining command: the fields of its config sections, and
  the augmentation flags (which make the two views' `ViewConfig`s)."""
  if "depth" in _TARGET[0]:
    return
  from corinfomax_tf import config
  define_data_flags()
  _define_input_and_augmentation_flags()
  for section in (config.DataConfig, config.ModelConfig, config.LossConfig,
                  config.OptimConfig, config.TrainConfig):
    define_config_flags(section)


def _aug(define, name, *args):
  _track(define, name, *args, group="augmentation")


def _define_input_and_augmentation_flags():
  """Flags that are not one config field each: the normalisation (mean and std) and
  the views' augmentation, whose defaults are the paper's views."""
  from corinfomax_tf.data import views
  view1, view2 = (views.ViewConfig(blur_prob=1.0, solarize_prob=0.0),
                  views.ViewConfig(blur_prob=0.1, solarize_prob=0.2))
  _aug(flags.DEFINE_string, "normalization", "auto",
       "Per-channel mean/std: auto (by data set), cifar10, cifar100, imagenet, digits.")
  _aug(flags.DEFINE_float, "crop_min_scale", view1.crop_scale[0],
       "Random resized crop: smallest area share.")
  _aug(flags.DEFINE_float, "hflip_prob", view1.hflip_prob, "Horizontal flip probability.")
  _aug(flags.DEFINE_float, "jitter_prob", view1.jitter_prob, "Colour jitter probability.")
  _aug(flags.DEFINE_float, "brightness", view1.brightness, "Colour jitter brightness strength.")
  _aug(flags.DEFINE_float, "contrast", view1.contrast, "Colour jitter contrast strength.")
  _aug(flags.DEFINE_float, "saturation", view1.saturation, "Colour jitter saturation strength.")
  _aug(flags.DEFINE_float, "hue", view1.hue, "Colour jitter hue strength.")
  _aug(flags.DEFINE_float, "grayscale_prob", view1.grayscale_prob, "Grayscale probability.")
  _aug(flags.DEFINE_list, "blur_prob", [str(view1.blur_prob), str(view2.blur_prob)],
       "Gaussian blur probability: one value, or view1,view2.")
  _aug(flags.DEFINE_list, "solarize_prob", [str(view1.solarize_prob), str(view2.solarize_prob)],
       "Solarisation probability: one value, or view1,view2.")


def define_encoder_flag(help_text):
  flags.DEFINE_string("encoder", None, help_text)


def resolved_flagfile(flag_values):
  """The values of every flag above, as flagfile text (one --name=value a line)."""
  return flagfile_text({name: flag_values[name].value for name in _DEFINED})


def train_values(flag_values):
  """{flag name: value} of every pretraining flag (after `define_flags`), and of no
  other flag the command defines."""
  return {name: flag_values[name].value for name in defaults()}


def flagfile_text(values):
  """`values` (flag name -> value) as flagfile text (one --name=value a line)."""
  lines = ["# Resolved flags of this run; rerun with --flagfile=<this file>."]
  for name, value in values.items():
    if value is None:
      continue   # not given, and no default: the command decides (--jit_compile)
    if isinstance(value, (list, tuple)):
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
      if name in flags.FLAGS and isinstance(flags.FLAGS[name], flags.MultiFlag):
        continue   # repeated on purpose (--search)
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


_BOM = b"\xef\xbb\xbf"


def _readable_flagfile(given):
  """The flagfile absl should read for `--flagfile=given`: the shipped one where
  `given` names it, a copy without the byte-order mark some Windows editors write
  (absl would take the first flag for a stray argument); a file that cannot be read
  is one line naming it."""
  path = packaged_flagfile(given)
  try:
    with open(path, "rb") as fh:
      text = fh.read()
  except OSError as e:
    exit_with_error(f"--flagfile={given}: cannot be read ({e.strerror})")
  if not text.startswith(_BOM):
    return path
  import atexit
  import tempfile
  fd, copy = tempfile.mkstemp(suffix=".cfg", prefix="flagfile-")
  with os.fdopen(fd, "wb") as fh:
    fh.write(text[len(_BOM):])
  atexit.register(lambda: os.path.exists(copy) and os.remove(copy))
  return copy


def _resolve_flagfiles(argv):
  return [("--flagfile=" + _readable_flagfile(arg.split("=", 1)[1])
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
    # absl prefixes some messages with "ERROR:: "; ours start with "error: ".
    message = re.sub(r"^(ERROR:+ *)+", "", str(e))
    exit_with_error(f"{message}; see --help")
