"""Export of the encoder alone as a SavedModel, and loading encoders back.

An export holds the encoder (no projector, no loss state) with the training
normalisation inside the graph, and these endpoints (SavedModel signatures):

  serving_default(images: uint8 [B, H, W, 3])      -> {"features": [B, F]}
  serve_float(images: float32 in [0, 1])            -> {"features": [B, F]}
  feature_maps(images: float32 in [0, 1])           -> {"P2": ..., "P5": ...}
  call_inference(images: float32 in [0, 1])         -> [B, F]  (BatchNorm frozen)
  call_training(images: float32 in [0, 1])          -> [B, F]  (BatchNorm in training mode)

plus the variable collections `variables`, `trainable_variables` and
`non_trainable_variables`, so that gradients reach every encoder weight after
`tf.saved_model.load`, and `keras.layers.TFSMLayer(path, call_endpoint="call_inference",
call_training_endpoint="call_training")` wraps it as a trainable Keras layer.

What produced the export (architecture, input size, normalisation, step, the whole
training config) is in `assets.extra/corinfomax_tf.json`, and is returned by the
`metadata()` function of the loaded object.

Beside the SavedModel, `<export_dir>/preset` is a keras-hub preset of the same weights
(`models.backbone.CorInfoMaxBackbone`: the last feature map, normalised images in):
`keras_hub.models.Backbone.from_preset(<export_dir>/preset)` loads it on any Keras
backend after `import corinfomax_tf.models.backbone`; its `metadata.json` holds the
same metadata under "corinfomax_tf".

Exports are written into step-numbered directories next to the requested path
(`<export_dir>.steps/<step>/`), each first written under a temporary name and then
renamed; `<export_dir>` itself is a symbolic link switched atomically to the newest
step. A reader never sees a half-written export.
"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from corinfomax_tf import config as config_lib
from corinfomax_tf import errors, fingerprints
from corinfomax_tf.export import runtimes
from corinfomax_tf.models import backbone as backbone_lib  # (registers the class)
from corinfomax_tf.models import factory, pooling
from corinfomax_tf.training import keras_state
from corinfomax_tf.training import workdir as workdir_lib

METADATA_FILE = os.path.join("assets.extra", "corinfomax_tf.json")
FORMAT = "corinfomax_tf.encoder.v1"
PRESET_DIR = "preset"


# ----------------------------------------------------------------------------
# Restoring the encoder of a training workdir.
# ----------------------------------------------------------------------------


def restore_encoder(workdir, checkpoint=None):
  """(encoder, config dict, step, checkpoint path) from a training workdir's newest
  intact (or the given) checkpoint; raises a UserError naming the workdir or file."""
  with open(config_lib.training_config_path(workdir)) as fh:
    config = json.load(fh)
  directory = os.path.join(workdir, "checkpoints")
  if checkpoint and not tf.io.gfile.exists(checkpoint + ".index"):
    raise errors.ExportError(f"--checkpoint={checkpoint}: no such checkpoint")
  # Any backbone: what rebuilds it is in architecture.json; workdirs of earlier
  # releases (ResNets only) have none and name depth, stem and width in config.json.
  architecture_path = os.path.join(workdir, factory.ARCHITECTURE_FILE)
  architecture = config["model"]
  if os.path.isfile(architecture_path):
    with open(architecture_path) as fh:
      architecture = json.load(fh)
  encoder = factory.encoder_from_architecture(architecture)
  step = keras.Variable(0, dtype="int64", trainable=False)
  tracked, mirrors = {"encoder": encoder, "step": step}, []
  if config.get("train", {}).get("backend") == "jax":
    # A run on JAX saved its variables by position (keras_state.py).
    tracked = keras_state.mirrored(tracked)
    mirrors = list(tracked.values())
  # A reader: damaged checkpoints are skipped (with a warning), never moved.
  checkpoints = workdir_lib.Checkpoints(tf.train.Checkpoint(**tracked), directory, keep=1,
                                        chief=False, mirrors=mirrors)
  path = (checkpoints.restore_from(checkpoint, partial=True) if checkpoint else
          checkpoints.restore_latest(partial=True))
  if not path:
    raise errors.ExportError(f"--workdir={workdir}: holds no checkpoint yet")
  return encoder, config, int(step.numpy()), path


def metadata_for(encoder, config, step, checkpoint_path=""):
  data = config["data"]
  return {
      "format": FORMAT,
      "architecture": factory.architecture(encoder),
      "image_size": data["image_size"],
      "normalization": {"mean": list(data["mean"]), "std": list(data["std"])},
      "input": "serving_default: uint8 pixels; other endpoints: float32 in [0, 1]",
      "dataset": data["dataset"],
      "step": step,
      "checkpoint": checkpoint_path,
      "config": config,
  }


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------


def build_archive(backbone, metadata):
  """The SavedModel's endpoints: pooled features (the backbone ends with a feature
  map), the stage outputs, the metadata, and the variables."""
  mean = tf.constant(metadata["normalization"]["mean"], tf.float32)
  std = tf.constant(metadata["normalization"]["std"], tf.float32)
  encoder = pooling.pooled_model(backbone)
  pyramid = _pyramid_model(backbone)
  metadata_json = json.dumps(metadata, sort_keys=True)

  def normalize(images01):
    return (tf.cast(images01, tf.float32) - mean) / std

  any_uint8 = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
  any_float = [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]
  archive = keras.export.ExportArchive()
  archive.track(encoder)
  if pyramid is not None:
    archive.track(pyramid)
  archive.add_endpoint(
      "serving_default",
      lambda images: {"features": encoder(normalize(tf.cast(images, tf.float32) / 255.0),
                                          training=False)},
      input_signature=any_uint8)
  archive.add_endpoint(
      "serve_float",
      lambda images: {"features": encoder(normalize(images), training=False)},
      input_signature=any_float)
  if pyramid is not None:
    archive.add_endpoint("feature_maps",
                         lambda images: pyramid(normalize(images), training=False),
                         input_signature=any_float)
  archive.add_endpoint("call_inference", lambda images: encoder(normalize(images),
                                                                training=False),
                       input_signature=any_float)
  archive.add_endpoint("call_training", lambda images: encoder(normalize(images),
                                                               training=True),
                       input_signature=any_float)
  archive.add_endpoint("metadata", lambda: tf.constant(metadata_json), input_signature=[])
  archive.add_variable_collection("variables", encoder.variables)
  archive.add_variable_collection("trainable_variables", encoder.trainable_variables)
  archive.add_variable_collection("non_trainable_variables",
                                  encoder.non_trainable_variables)
  return archive


def _pyramid_model(backbone):
  """{"P2": ..., ...} feature maps: our ResNet's stage outputs, a keras-hub
  FeaturePyramidBackbone's pyramid; None for a backbone without one."""
  if isinstance(backbone, backbone_lib.CorInfoMaxBackbone):
    return backbone_lib.stage_model(backbone)
  outputs = getattr(backbone, "pyramid_outputs", None)
  if not outputs:
    return None
  return keras.Model(backbone.input, dict(outputs), name=f"{backbone.name}_pyramid")


def steps_dir(export_dir):
  return os.path.normpath(export_dir) + ".steps"


def is_our_export(path):
  return os.path.isfile(os.path.join(path, METADATA_FILE))


def write_export(backbone, metadata, export_dir, overwrite=False, *, onnx=True,
                 litert=True, log=print):
  """Writes <export_dir>.steps/<step>/ atomically and points <export_dir> at it: the
  SavedModel, the keras-hub preset, and (`onnx`, `litert`) encoder.onnx and
  encoder.tflite, each checked by its own runtime against the SavedModel
  (`export.runtimes`; the measured differences go to metadata["runtimes"]).

  Returns the step directory. Refuses (errors.ExportError) an export_dir that exists and
  is not one of our exports, and an existing step unless `overwrite`.
  """
  export_dir = os.path.normpath(export_dir)
  if os.path.lexists(export_dir) and not os.path.islink(export_dir):
    raise errors.ExportError(f"--export_dir={export_dir}: exists and is not an export link of "
                      "corinfomax_tf; choose another path")
  if os.path.islink(export_dir) and not is_our_export(export_dir):
    raise errors.ExportError(f"--export_dir={export_dir}: is a link to something that is not a "
                      "corinfomax_tf export")
  root = steps_dir(export_dir)
  os.makedirs(root, exist_ok=True)
  final = os.path.join(root, str(metadata["step"]))
  if os.path.exists(final) and not overwrite:
    raise errors.ExportError(f"--export_dir={export_dir}: step {metadata['step']} is already "
                      f"exported at {final} (pass --overwrite to replace it)")
  remove_abandoned(root, log)
  tmp = os.path.join(root, f".tmp-{metadata['step']}-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  writer = _hold_writer_lock(tmp)
  try:
    return _write_step(backbone, metadata, export_dir, tmp, final, onnx, litert, log)
  finally:
    _release_writer_lock(writer)


def _hold_writer_lock(tmp):
  """`<tmp>.lock`, flock'ed while this process writes `tmp`: the system releases it
  when the process dies, which is how the next export knows `tmp` is abandoned."""
  fh = open(tmp + ".lock", "a+")
  fcntl.flock(fh, fcntl.LOCK_EX)
  return fh


def _release_writer_lock(fh):
  fcntl.flock(fh, fcntl.LOCK_UN)
  fh.close()
  try:
    os.remove(fh.name)
  except OSError:
    pass


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True   # alive, another user's
  return True


def remove_abandoned(root, log=print):
  """Removes the temporary folders (`.tmp-<step>-<pid>`, `.old-<pid>` of a step) that
  an export killed mid-write left in `root`: those whose writer lock is free, or, for
  folders of older versions without a lock, whose process is gone on this host. A
  live writer's folder is never touched."""
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    m = re.fullmatch(r"(\.tmp-\d+|\d+\.old)-(\d+)", name)
    if not m or not os.path.isdir(path):
      continue
    lock = path + ".lock"
    if os.path.exists(lock):
      with open(lock, "a+") as fh:
        try:
          fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
          continue   # its writer is alive
        shutil.rmtree(path, ignore_errors=True)
        os.remove(lock)
        fcntl.flock(fh, fcntl.LOCK_UN)
    elif not _pid_alive(int(m.group(2))):
      shutil.rmtree(path, ignore_errors=True)
    else:
      continue
    log(f"Removed {path}: left by an export that was killed mid-write")


def _write_step(backbone, metadata, export_dir, tmp, final, onnx, litert, log):
  build_archive(backbone, metadata).write_out(tmp, verbose=False)
  if onnx or litert:
    metadata = {**metadata, "runtimes": _runtime_files(backbone, metadata, tmp, onnx,
                                                       litert, log)}
  os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
  metadata = {**metadata, "files": _file_list(backbone, metadata)}
  with open(os.path.join(tmp, METADATA_FILE), "w") as fh:
    json.dump(metadata, fh, indent=2, sort_keys=True)
  if has_preset_support(backbone):
    write_preset(backbone, metadata, os.path.join(tmp, PRESET_DIR))
  if os.path.exists(final):
    old = f"{final}.old-{os.getpid()}"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old)
  else:
    os.rename(tmp, final)
  _point_link(export_dir, os.path.relpath(final, os.path.dirname(export_dir) or "."))
  return final


def _file_list(backbone, metadata):
  """What an export step holds, for its metadata and the command's line."""
  files = ["saved_model.pb", "variables/", METADATA_FILE]
  files += [entry["file"] for entry in metadata.get("runtimes", {}).values()
            if "file" in entry and "error" not in entry]
  if has_preset_support(backbone):
    files.append(PRESET_DIR + "/")
  return files


def files_line(path):
  """One line: the files an export step holds and, for a runtime file that was
  asked for and is missing, why (from its metadata)."""
  metadata = read_metadata(path)
  files = metadata.get("files") or ["saved_model.pb", "variables/"]
  line = "Files: " + ", ".join(files)
  names = {"onnx": runtimes.ONNX_FILE, "litert": runtimes.LITERT_FILE}
  missing = [f"{entry.get('file', names.get(name, name))} ({entry['error']})"
             for name, entry in sorted(metadata.get("runtimes", {}).items())
             if "error" in entry]
  if missing:
    line += "; not written: " + "; ".join(missing)
  return line


def _runtime_files(backbone, metadata, directory, onnx, litert, log):
  """encoder.onnx / encoder.tflite in `directory`, run by their runtimes on real
  images and compared with the SavedModel written there; the metadata entry."""
  files = runtimes.write_runtime_files(backbone, metadata, directory, onnx=onnx,
                                       litert=litert, log=log)
  images = runtimes.check_images(metadata["image_size"])
  want = tf.saved_model.load(directory).signatures["serving_default"](
      images=tf.constant(images))["features"].numpy()
  report = runtimes.check_runtime_files(directory, files, images, want, log=log)
  for name, entry in report.items():
    if "relative_difference" in entry:
      entry["check"] = (f"{len(images)} digits images (scikit-learn's, resized), "
                        "against the SavedModel's serving_default")
  return report


def has_preset_support(backbone):
  """keras-hub presets hold keras-hub `Backbone`s (ours is one); a plain keras.Model
  is exported as a SavedModel only."""
  return isinstance(backbone, keras_hub.models.Backbone)


def write_preset(backbone, metadata, preset_dir):
  """The backbone as a keras-hub preset, with the export's metadata (how it was
  trained, how to normalise) in its metadata.json."""
  backbone.save_to_preset(preset_dir)
  path = os.path.join(preset_dir, "metadata.json")
  with open(path) as fh:
    preset_metadata = json.load(fh)
  preset_metadata["corinfomax_tf"] = metadata
  with open(path, "w") as fh:
    json.dump(preset_metadata, fh, indent=2, sort_keys=True)


def load_preset(path):
  """The keras-hub backbone of an export's preset, with the export's metadata.

  Args:
    path: an export directory (its `preset/` is read) or a preset directory written
      by an export.

  Returns:
    (backbone, metadata): the `keras_hub.models.Backbone` (normalised images in, its
    last feature map or tokens out) and the export metadata (image size,
    normalisation, architecture, step, training config).

  Example:

  ```python
  backbone, meta = corinfomax_tf.load_preset("runs/digits/export")
  mean, std = (np.array(meta["normalization"][k]) for k in ("mean", "std"))
  features = corinfomax_tf.pooled_model(backbone)((images01 - mean) / std)
  ```
  """

  preset = os.path.join(path, PRESET_DIR) if is_our_export(path) else path
  if not os.path.isfile(os.path.join(preset, "config.json")):
    raise errors.ExportError(f"--encoder={path}: holds no keras-hub preset (its backbone "
                             "is not a keras-hub Backbone, or it was exported before "
                             "presets were written)")
  metadata = _preset_metadata(preset)
  return keras_hub.models.Backbone.from_preset(preset), metadata


def _point_link(link, target):
  tmp = f"{link}.tmp-link-{os.getpid()}"
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(target, tmp)
  os.replace(tmp, link)


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------


def read_metadata(path):
  if not is_our_export(path):
    raise errors.ExportError(f"--encoder={path}: not a corinfomax_tf encoder export "
                      f"(no {METADATA_FILE})")
  with open(os.path.join(path, METADATA_FILE)) as fh:
    metadata = json.load(fh)
  if metadata.get("format") != FORMAT:
    raise errors.ExportError(f"--encoder={path}: export format {metadata.get('format')!r}, "
                      f"expected {FORMAT!r}")
  return metadata


def provenance(path, metadata, dataset, identity=None):
  """What a downstream result was computed from: the encoder, its step and (with
  `identity`, see `encoder_identity`) the digest of its weights, the data."""
  out = {"encoder": os.path.abspath(path), "encoder_step": metadata["step"],
         "dataset": dataset}
  if identity:
    out["encoder_weights"] = identity["weights"]
  return out


def encoder_identity(variables, metadata):
  """{"weights": digest of the encoder's weights, "step": its training step}: what a
  downstream result is keyed by (not the encoder's path, which may point elsewhere
  later)."""
  return {"weights": fingerprints.weights_digest(variables), "step": metadata.get("step")}


def _config_json(path):
  try:
    with open(os.path.join(path, "config.json")) as fh:
      return json.load(fh)
  except (OSError, ValueError):
    return None


def encoder_kind(path):
  """"export", "preset" (a keras-hub preset folder), "workdir" (a training workdir),
  or a UserError naming --encoder."""
  if not os.path.exists(path):
    raise errors.ExportError(f"--encoder={path}: does not exist")
  if is_our_export(path):
    return "export"
  config = _config_json(path)
  if isinstance(config, dict) and "model" in config and "data" in config:
    return "workdir"
  if isinstance(config, dict) and "class_name" in config:
    return "preset"
  raise errors.ExportError(f"--encoder={path}: not a corinfomax_tf encoder export (no "
                           f"{METADATA_FILE}), nor its preset, nor a training workdir")


def _preset_metadata(path):
  """The export metadata a preset of ours holds, or a UserError naming --encoder."""
  try:
    with open(os.path.join(path, "metadata.json")) as fh:
      metadata = json.load(fh).get("corinfomax_tf")
  except (OSError, ValueError, AttributeError):
    metadata = None
  if not isinstance(metadata, dict) or "normalization" not in metadata:
    raise errors.ExportError(
        f"--encoder={path}: a keras-hub preset that no corinfomax_tf export wrote (its "
        "metadata.json holds no image size and normalisation); pretrain from it with "
        f"--backbone={path}, then export")
  return metadata


def _export_of_preset(path):
  """The export a preset folder belongs to (its parent), or None."""
  parent = os.path.dirname(os.path.normpath(os.path.abspath(path)))
  return parent if is_our_export(parent) else None


def _resolved(path):
  """(path, kind) of --encoder: an export's preset folder stands for its export."""
  kind = encoder_kind(path)
  if kind == "preset" and _export_of_preset(path):
    return _export_of_preset(path), "export"   # the SavedModel beside it
  return path, kind


class FrozenEncoder:
  """A callable on float images in [0, 1] -> pooled features, from an export or a
  training workdir, with the export's metadata."""

  def __init__(self, fn, metadata, trainable_variables=(), owner=None):
    self._fn = fn
    # The loaded SavedModel (or Keras model) owning the variables: the function
    # alone does not keep them alive.
    self._owner = owner
    self.metadata = metadata
    self.trainable_variables = list(trainable_variables)
    self.identity = None   # encoder_identity(...), set by load_encoder

  @property
  def image_size(self):
    return self.metadata["image_size"]

  @property
  def feature_dim(self):
    return self.metadata["architecture"]["feature_dim"]

  @property
  def architecture(self):
    return self.metadata["architecture"]

  def __call__(self, images01, training=False):
    # Frozen: BatchNorm in inference mode whatever `training` says.
    return self._fn(images01)


def load_saved_model(path, flag="--encoder"):
  """tf.saved_model.load, with a damaged or cut SavedModel (its graph or its
  variables) as one ExportError naming the export."""
  try:
    loaded = tf.saved_model.load(path)
    # Reading the variables is where a cut data file shows.
    for variable in loaded.variables:
      variable.numpy()
    return loaded
  except (OSError, IndexError, ValueError, tf.errors.OpError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
    raise errors.ExportError(
        f"{flag}={path}: the SavedModel cannot be read ({type(e).__name__}: {first}); "
        "the export is damaged or cut short: export it again (corinfomax export "
        "--overwrite)") from None


def load_encoder(path, runtime="tensorflow"):
  """A frozen encoder: float images in [0, 1] in, pooled features out.

  Args:
    path: an export directory (or its link), its preset folder, a preset of ours
      copied elsewhere, or a training workdir (its newest intact checkpoint).
    runtime: "tensorflow" (the SavedModel), or "onnx": the export's encoder.onnx in
      ONNX Runtime (`runtimes.OnnxEncoder`, same call, NumPy out).

  Returns:
    A `FrozenEncoder`: callable on [B, H, W, 3] float32 images in [0, 1] (BatchNorm
    frozen), with `metadata`, `image_size`, `feature_dim` and `identity` (the digest
    of its weights and its step). Raises `errors.ExportError` naming `--encoder`.

  Example:

  ```python
  encoder = corinfomax_tf.load_encoder("runs/digits/export")
  features = encoder(tf.image.resize(images, (encoder.image_size,) * 2) / 255.0)
  ```
  """
  path, kind = _resolved(path)
  if runtime == "onnx":
    if kind != "export":
      raise errors.ExportError(f"--runtime=onnx: --encoder={path} is not an export (a "
                               "training workdir or preset has no encoder.onnx); export it")
    return runtimes.OnnxEncoder(path, read_metadata(path))
  if kind == "export":
    metadata = read_metadata(path)
    loaded = load_saved_model(path)
    encoder = FrozenEncoder(loaded.call_inference, metadata, loaded.trainable_variables,
                            owner=loaded)
    encoder.identity = encoder_identity(loaded.variables, metadata)
    return encoder
  if kind == "preset":
    backbone, metadata = load_preset(path)
  else:
    backbone, config, step, _ = restore_encoder(path)
    metadata = metadata_for(backbone, config, step)
  pooled = pooling.pooled_model(backbone)
  mean = tf.constant(metadata["normalization"]["mean"], tf.float32)
  std = tf.constant(metadata["normalization"]["std"], tf.float32)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  def call(images01):
    return pooled((images01 - mean) / std, training=False)
  encoder = FrozenEncoder(call, metadata, pooled.trainable_variables, owner=pooled)
  encoder.identity = encoder_identity(backbone.weights, metadata)
  return encoder


def load_trainable_encoder(path):
  """(backbone, metadata): a live, trainable encoder for fine-tuning, from
  an export's keras-hub preset, a preset folder, or a training workdir's checkpoint.
  metadata["identity"] identifies its weights (`encoder_identity`).

  The preset is checked against the SavedModel beside it (pooled features on a random
  batch), so an export whose two halves disagree can never go unnoticed. The backbone
  takes normalised images (metadata["normalization"]) and returns its last feature map.
  """
  path, kind = _resolved(path)
  if kind == "workdir":
    backbone, config, step, _ = restore_encoder(path)
    metadata = metadata_for(backbone, config, step)
  elif kind == "preset":
    backbone, metadata = load_preset(path)
  else:
    backbone, metadata = _checked_preset_of_export(path)
  return backbone, {**metadata, "identity": encoder_identity(backbone.weights, metadata)}


def _checked_preset_of_export(path):

  read_metadata(path)  # one line if it is not an export of ours
  backbone, metadata = load_preset(path)
  size = metadata["image_size"]
  images = tf.random.stateless_uniform([2, size, size, 3], seed=[0, 1])
  mean = tf.constant(metadata["normalization"]["mean"], tf.float32)
  std = tf.constant(metadata["normalization"]["std"], tf.float32)
  loaded = tf.saved_model.load(path)  # held: its function needs its variables
  want = loaded.call_inference(images).numpy()
  got = np.asarray(pooling.pool(backbone, backbone((images - mean) / std, training=False)))
  if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max())):
    raise errors.ExportError(f"--encoder={path}: its preset does not reproduce the "
                             "SavedModel's features (max difference "
                             f"{np.abs(got - want).max():.3g}); re-export it")
  return backbone, metadata


def export_workdir_in_tensorflow(workdir, export_dir, *, onnx=True, litert=True, log=print):
  """`export_workdir` of the newest checkpoint in a process of its own on Keras'
  TensorFlow backend (the `export` command): how a run on JAX exports. Its warning and
  runtime lines go to `log`; a failure is one line. Returns (step directory, step)."""
  env = dict(os.environ, KERAS_BACKEND="tensorflow")
  args = [sys.executable, "-m", "corinfomax_tf.export", f"--workdir={workdir}",
          f"--export_dir={export_dir}", "--overwrite", f"--{'' if onnx else 'no'}onnx",
          f"--{'' if litert else 'no'}litert"]
  proc = subprocess.run(args, env=env, capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if not line.startswith(("Exported step", "Files:")):
      log(line)
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise errors.ExportError(f"the export of {workdir} on the TensorFlow backend failed: "
                             f"{last.removeprefix('error: ')}")
  path = os.path.realpath(export_dir)   # the link points at the step written
  return path, read_metadata(path)["step"]


def export_workdir(workdir, export_dir, checkpoint="", overwrite=False, *, onnx=True,
                   litert=True, log=print):
  """Exports the encoder of a training workdir's checkpoint, then proves the export
  reloads and computes what the live encoder computes.

  Args:
    workdir: a training workdir.
    export_dir: the export's path: a link switched to `<export_dir>.steps/<step>/`.
    checkpoint: a checkpoint prefix (default: the newest intact one).
    overwrite: replace an existing export of the same step.
    onnx: also write encoder.onnx, checked by ONNX Runtime (`write_export`).
    litert: also write encoder.tflite, checked by the LiteRT interpreter.
    log: where progress and warning lines go.

  Returns:
    (the step directory written, the step).

  Example:

  ```python
  path, step = corinfomax_tf.export_workdir("runs/digits", "runs/digits/export")
  tf.saved_model.load(path).signatures["serving_default"](images=uint8_images)
  ```
  """

  backbone, config, step, checkpoint = restore_encoder(workdir, checkpoint or None)
  metadata = metadata_for(backbone, config, step, checkpoint)
  path = write_export(backbone, metadata, export_dir, overwrite=overwrite, onnx=onnx,
                      litert=litert, log=log)
  encoder = pooling.pooled_model(backbone)
  size = metadata["image_size"]
  images = np.random.RandomState(0).randint(0, 256, (3, size, size, 3)).astype(np.uint8)
  loaded = tf.saved_model.load(path)
  got = loaded.signatures["serving_default"](images=tf.constant(images))["features"]
  mean = np.array(metadata["normalization"]["mean"], np.float32)
  std = np.array(metadata["normalization"]["std"], np.float32)
  want = encoder((images.astype(np.float32) / 255.0 - mean) / std, training=False)
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
  if has_preset_support(backbone):
    preset, _ = load_preset(path)
    pooled = pooling.pool(preset, preset((images.astype(np.float32) / 255.0 - mean) / std,
                                         training=False))
    np.testing.assert_allclose(np.asarray(pooled), got.numpy(), rtol=1e-4, atol=1e-5)
  return path, step
