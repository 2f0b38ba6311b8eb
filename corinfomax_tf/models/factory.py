"""The one place an encoder (backbone) is built: from a config, an export's
metadata, a keras-hub preset, a serialized Keras config, or a seed.

Pretraining, the probes, export, fine-tuning and detection all build their encoder
here, so that one architecture description means one network:
  * our ResNets: {"depth", "stem", "width"} (a training config's "model" section,
    or an export's metadata["architecture"]);
  * any other backbone: {"backbone_config": <what keras.saving.serialize_keras_object
    writes>} (an export's or a workdir's architecture).
"""

import json
import os

import keras
import keras_hub

from corinfomax_tf import errors
from corinfomax_tf.models import backbone as backbone_lib
from corinfomax_tf.models import pooling
from corinfomax_tf.models.specs import RESNETS, is_resnet, read_backbone_config  # noqa: F401

ARCHITECTURE_FILE = "architecture.json"


def encoder(depth, stem, width, *, name="encoder", sync_batch_norm=False, image_size=None,
            fused_batch_norm=False):
  """A `backbone.CorInfoMaxBackbone`: the last feature map (pool it with
  `pooling.pooled_model`), `pyramid_outputs` for detection."""
  return backbone_lib.CorInfoMaxBackbone(depth=depth, stem=stem, width=width,
                                     image_size=image_size,
                                     sync_batch_norm=sync_batch_norm,
                                     fused_batch_norm=fused_batch_norm, name=name)


def from_serialized(config, *, name=None):
  """A backbone from the dict `keras.saving.serialize_keras_object` wrote (new,
  randomly initialised weights)."""
  config = json.loads(json.dumps(config))   # never alter the caller's dict
  if name:
    config.setdefault("config", {})["name"] = name
  return keras.saving.deserialize_keras_object(config)


def backbone_from_file(path, flag="--backbone_config"):
  """The backbone a --backbone_config file describes; anything that is not a built
  keras.Model taking one image batch (an optimizer, a layer, a Sequential without
  an input) is one ConfigError naming the file."""
  config = read_backbone_config(path, flag)
  try:
    backbone = from_serialized(config)
  except Exception as e:  # noqa: BLE001  (Keras raises many kinds for bad configs)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
    raise errors.ConfigError(f"{flag}={path}: cannot be rebuilt as a Keras object "
                             f"({type(e).__name__}: {first})") from None
  kind = config.get("class_name")
  if not isinstance(backbone, keras.Model):
    raise errors.ConfigError(
        f"{flag}={path}: holds a {kind} ({type(backbone).__name__}), not a backbone: "
        "serialize a keras.Model that takes images (keras-hub backbone, functional "
        "model, or a Sequential with an Input)")
  try:
    inputs = backbone.inputs
  except (AttributeError, ValueError):
    inputs = None
  if not inputs:
    raise errors.ConfigError(
        f"{flag}={path}: the {kind} has no defined input (a Sequential or subclassed "
        "model never called): give it an Input (keras.Input(shape=(H, W, 3))) before "
        "serializing it")
  return backbone


def from_preset(preset, flag="--backbone"):
  """A keras-hub backbone with its weights, from a preset directory (an export of
  ours holds one under preset/) or a name keras-hub can fetch."""
  if os.path.isdir(os.path.join(preset, "preset")):
    preset = os.path.join(preset, "preset")
  if os.path.isdir(preset) and not os.path.isfile(os.path.join(preset, "config.json")):
    raise errors.ConfigError(f"{flag}={preset}: a directory without a keras-hub preset "
                             "(no config.json)")
  try:
    return keras_hub.models.Backbone.from_preset(preset)
  except Exception as e:  # noqa: BLE001  (keras-hub raises many kinds; one line)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise errors.ConfigError(
        f"{flag}={preset}: not a resnet name and no keras-hub preset could be loaded "
        f"({first}); give a preset directory, a keras-hub preset name (needs the "
        "network), or --backbone_config=FILE") from None


def build(model_cfg, *, image_size=None, sync_batch_norm=False, name="encoder"):
  """The backbone a training config's model section names (a ModelConfig or its
  dict): our ResNet, a keras-hub preset (with its weights), or a serialized config."""
  get = (model_cfg.get if isinstance(model_cfg, dict)
         else lambda key, default=None: getattr(model_cfg, key, default))
  kind = get("backbone", "resnet") or "resnet"
  config_path = get("backbone_config", "")
  if config_path:
    backbone = backbone_from_file(config_path)
  elif is_resnet(kind):
    return encoder(get("depth"), get("stem"), get("width"), name=name,
                   sync_batch_norm=sync_batch_norm,
                   fused_batch_norm=bool(get("fused_batch_norm", False)))
  else:
    backbone = from_preset(kind)
  check_input_size(backbone, image_size, kind if not config_path else config_path,
                   "--backbone" if not config_path else "--backbone_config")
  return backbone


def check_input_size(backbone, image_size, what, flag):
  """A backbone built for a fixed input size must get images of that size."""
  shape = tuple(backbone.input.shape[1:3])
  if image_size and None not in shape and shape != (image_size, image_size):
    raise errors.ConfigError(
        f"--image_size={image_size}: the backbone of {flag}={what} takes "
        f"{shape[0]}x{shape[1]} images; give --image_size={shape[0]} or a backbone "
        "built for this size")
  if len(backbone.inputs) != 1:
    raise errors.ConfigError(f"{flag}={what}: the backbone takes {len(backbone.inputs)} "
                             "inputs; an encoder takes one batch of images")


def architecture(backbone):
  """What rebuilds the backbone (without its weights): the ResNet's depth, stem and
  width, or its serialized config; with the pooled feature dimension and how
  features are taken."""
  shape = tuple(backbone.input.shape[1:3])
  info = {"feature_dim": pooling.feature_dim(backbone),
          "output": pooling.describe(backbone),
          # The input size the network is built for; None: any.
          "input_size": None if None in shape else list(shape)}
  if isinstance(backbone, backbone_lib.CorInfoMaxBackbone):
    return {"depth": backbone.depth, "stem": backbone.stem, "width": backbone.width,
            **info}
  return {"backbone": type(backbone).__name__,
          "backbone_config": json.loads(json.dumps(
              keras.saving.serialize_keras_object(backbone))), **info}


def same_architecture(saved, current, exact=True):
  """Whether two `architecture(...)` dicts describe one network. The backbone's own
  name is left out; with `exact=False` (a model built in Python, whose layer names
  Keras numbers per process) only the class, feature dimension and output kind."""
  def key(arch):
    arch = json.loads(json.dumps(arch))
    config = arch.pop("backbone_config", None)
    if config is not None:
      config.get("config", {}).pop("name", None)
      arch["backbone_config"] = config if exact else config.get("class_name")
    return arch
  return key(saved) == key(current)


def encoder_from_architecture(architecture, *, name="encoder"):
  """From `architecture(...)`'s dict, or a dict holding depth, stem and width (a
  training config's "model" section)."""
  if "backbone_config" in architecture and isinstance(architecture["backbone_config"],
                                                      dict):
    return from_serialized(architecture["backbone_config"], name=name)
  return encoder(architecture["depth"], architecture["stem"], architecture["width"],
                 name=name)


def random_encoder(architecture, seed, *, name="encoder"):
  """The same architecture from a random initialisation drawn from `seed`: the
  baseline a pretrained encoder has to beat."""
  keras.utils.set_random_seed(seed)
  return encoder_from_architecture(architecture, name=name)

