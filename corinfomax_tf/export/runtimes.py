"""The encoder for the runtimes people deploy on: ONNX (ONNX Runtime) and LiteRT
(TensorFlow Lite), each checked by its own runtime before the export returns.

    files = write_runtime_files(backbone, metadata, step_dir, onnx=True, litert=True)
    metadata["runtimes"] = check_runtime_files(step_dir, files, images)

Both files take uint8 pixels [B, H, W, 3] at the training image size, with the
training normalisation inside, and return the pooled features [B, F] (the
SavedModel's `serving_default`):
  * `encoder.onnx`: batch size free (a dynamic first dimension), input "images",
    output "features"; written by Keras' own `Model.export(format="onnx")`
    (tf2onnx's `from_keras` is broken with Keras 3).
  * `encoder.tflite`: batch size RUNTIME_BATCH (LiteRT interpreters allocate fixed
    shapes; `resize_tensor_input` changes it), written by `Model.export(format="litert")`.

A backbone a converter cannot handle gets one line naming the format and why; the
other files are still written. Each written file is run by its runtime (onnxruntime;
ai-edge-litert's interpreter) on a batch of images and compared with the SavedModel's
features: the largest difference relative to the largest feature must stay within
TOLERANCE; the tolerance and the measured difference go to the export metadata.
"""

import os

import keras
import numpy as np
import onnxruntime
import tensorflow as tf
import tf2onnx
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits
from tensorflow.python.framework import convert_to_constants
from tf2onnx import utils
from tf2onnx.handler import tf_op

from corinfomax_tf import errors, fingerprints, quiet
from corinfomax_tf.models import pooling

ONNX_FILE = "encoder.onnx"
LITERT_FILE = "encoder.tflite"
RUNTIME_BATCH = 1
# Largest |feature difference| / largest |feature| a runtime may show: float32 graphs
# compiled by another runtime sum in another order (measured: ~1e-6).
TOLERANCE = 1e-4


def pixel_model(backbone, metadata):
  """uint8 pixels -> pooled features, the normalisation inside: a functional Keras model."""

  size = metadata["image_size"]
  mean = np.asarray(metadata["normalization"]["mean"], "float32")
  std = np.asarray(metadata["normalization"]["std"], "float32")
  pooled = pooling.pooled_model(backbone)
  pixels = keras.Input((size, size, 3), dtype="uint8", name="images")
  x = keras.layers.Rescaling(1.0 / (255.0 * std), offset=-mean / std, name="normalize")(
      keras.ops.cast(pixels, "float32"))
  features = keras.layers.Identity(name="features")(pooled(x, training=False))
  return keras.Model(pixels, features, name="pixels_to_features")


_ONNX_HANDLERS = []


def _register_onnx_handlers():
  """tf2onnx has no handler for TensorFlow's Erfc, which exact GELU (ViT's MLPs) uses:
  register erfc(x) = 1 - erf(x) through tf2onnx's own handler registry (once)."""
  if _ONNX_HANDLERS:
    return

  @tf_op("Erfc")
  class Erfc:  # noqa: F841  (registered by the decorator)
    @classmethod
    def version_9(cls, ctx, node, **kwargs):
      dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
      erf = ctx.make_node("Erf", [node.input[0]])
      one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype))
      outputs, shapes, dtypes = node.output, [ctx.get_shape(node.output[0])], [
          ctx.get_dtype(node.output[0])]
      ctx.remove_node(node.name)
      ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=outputs, name=node.name,
                    shapes=shapes, dtypes=dtypes)
  _ONNX_HANDLERS.append(Erfc)


def _write_onnx(model, path, size):
  """The model's function, frozen (variables and captured tensors as constants: some
  keras-hub layers capture tensors that `Model.export(format="onnx")` would leave as
  extra graph inputs), converted by tf2onnx's graph converter."""
  _register_onnx_handlers()
  try:  # tf2onnx 1.17 still uses NumPy 1 aliases; Keras' export applies the same patch
    from keras.src.export.tf2onnx_lib import patch_tf2onnx
    patch_tf2onnx()
  except ImportError:
    pass
  function = tf.function(lambda images: {"features": model(images, training=False)})
  concrete = function.get_concrete_function(
      tf.TensorSpec([None, size, size, 3], tf.uint8, name="images"))
  frozen = convert_to_constants.convert_variables_to_constants_v2(concrete)
  inputs = [t.name for t in frozen.inputs]
  outputs = [t.name for t in frozen.outputs]
  tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=inputs,
                                 output_names=outputs, opset=17, output_path=path,
                                 tensors_to_rename={inputs[0]: "images",
                                                    outputs[0]: "features"})


def _write_litert(model, path, size):
  model.export(path, format="litert", verbose=False,
               input_signature=[tf.TensorSpec([RUNTIME_BATCH, size, size, 3], tf.uint8,
                                              name="images")])


def write_runtime_files(backbone, metadata, directory, *, onnx=True, litert=True, log=print):
  """Writes encoder.onnx and encoder.tflite into `directory` (those asked for);
  returns {format: file name or {"error": why}}. A converter's failure is one line
  (`log`), never the end of the export."""
  model = pixel_model(backbone, metadata)
  size = metadata["image_size"]
  out = {}
  for name, wanted, file_name, write in (("onnx", onnx, ONNX_FILE, _write_onnx),
                                         ("litert", litert, LITERT_FILE, _write_litert)):
    if not wanted:
      continue
    path = os.path.join(directory, file_name)
    try:
      with quiet.converter_warnings():
        write(model, path, size)
      out[name] = file_name
    except Exception as e:  # noqa: BLE001  (any converter failure is reported, not fatal)
      reason = " ".join(str(e).split())[:300] or type(e).__name__
      log(f"warning: no {file_name}: the {name} converter cannot handle this backbone "
          f"({type(e).__name__}: {reason}); the other formats are written")
      out[name] = {"error": f"{type(e).__name__}: {reason}"}
      if os.path.exists(path):
        os.remove(path)
  return out


def onnx_session(path, threads=0):
  """An ONNX Runtime session on the CPU (`threads`: intra-op threads, 0: every core)."""
  options = onnxruntime.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  try:
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # noqa: BLE001  (onnxruntime's pybind errors share no base)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
    raise errors.ExportError(
        f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {first}); the file is "
        "damaged or cut short: export again (corinfomax export --overwrite), or use "
        "--runtime=tensorflow") from None


def run_onnx(path, images, threads=0):
  """Features of uint8 `images` [B, H, W, 3] by ONNX Runtime (CPU)."""
  session = onnx_session(path, threads)
  name = session.get_inputs()[0].name
  return session.run(None, {name: np.asarray(images, np.uint8)})[0]


def run_litert(path, images):
  """Features of uint8 `images` by the LiteRT interpreter, RUNTIME_BATCH at a time."""
  with quiet.filtered_stderr(quiet.LITERT):
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
  source = interpreter.get_input_details()[0]
  target = interpreter.get_output_details()[0]
  batch = int(source["shape"][0])
  out = []
  for start in range(0, len(images), batch):
    chunk = np.asarray(images[start:start + batch], np.uint8)
    if len(chunk) < batch:  # the last, short batch: padded, then cut
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
    interpreter.set_tensor(source["index"], chunk)
    interpreter.invoke()
    out.append(interpreter.get_tensor(target["index"])[:len(images) - start])
  return np.concatenate(out)


def check_images(size, count=16):
  """Real images for the runtime checks, at any size and with no download: scikit-learn's
  handwritten digits (grey 0..16, made RGB 0..255), resized to `size`, uint8."""
  digits = load_digits().images[:count] * (255.0 / 16.0)
  rgb = np.repeat(digits[..., None], 3, axis=-1).astype("float32")
  resized = tf.image.resize(rgb, (size, size), method="bilinear").numpy()
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def relative_difference(got, want):
  return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def check_runtime_files(directory, files, images, want, log=print):
  """Runs each written file on `images` (uint8) with its own runtime and compares
  with `want` (the SavedModel's features). Returns the metadata entry:
  {format: {"file", "runtime", "tolerance", "relative_difference", "batch_size",
  "input", "output"} or {"error"}}; raises errors.ExportError past the tolerance."""
  runners = {"onnx": (run_onnx, "onnxruntime", None), "litert": (run_litert,
                                                                 "ai-edge-litert", RUNTIME_BATCH)}
  report = {}
  for name, file_name in files.items():
    if not isinstance(file_name, str):
      report[name] = file_name
      continue
    run, runtime, batch = runners[name]
    try:
      got = run(os.path.join(directory, file_name), images)
    except Exception as e:  # noqa: BLE001  (a file its runtime cannot run is not kept)
      reason = " ".join(str(e).split())[:300]
      log(f"warning: no {file_name}: {runtime} cannot run what the {name} converter wrote "
          f"({type(e).__name__}: {reason}); the other formats are kept")
      os.remove(os.path.join(directory, file_name))
      report[name] = {"error": f"{runtime}: {type(e).__name__}: {reason}"}
      continue
    difference = relative_difference(got, want)
    if not difference <= TOLERANCE:
      raise errors.ExportError(
          f"{file_name}: {runtime} gives features {difference:.3g} (relative to the largest "
          f"feature) away from the SavedModel's, above the tolerance {TOLERANCE:g}; "
          f"skip it with --no{name}")
    report[name] = {"file": file_name, "runtime": runtime, "tolerance": TOLERANCE,
                    "relative_difference": difference, "batch_size": batch,
                    "input": "images: uint8 [B, H, W, 3]", "output": "features: float32 [B, F]"}
  return report


class OnnxEncoder:
  """An export's encoder.onnx run by ONNX Runtime, called like `saved_model.FrozenEncoder`
  on float images in [0, 1] (rounded to the uint8 pixels the file takes): features as
  a NumPy array. TensorFlow is not in the loop for the encoder; callers that trace
  (tf.function) check `outside_tensorflow` and call it eagerly."""

  outside_tensorflow = True

  def __init__(self, export_dir, metadata, threads=0):
    path = os.path.join(export_dir, ONNX_FILE)
    if not os.path.isfile(path):
      why = metadata.get("runtimes", {}).get("onnx", {}).get("error", "exported without it")
      raise errors.ExportError(f"--runtime=onnx: the export {export_dir} holds no "
                               f"{ONNX_FILE} ({why}); re-export it, or use "
                               "--runtime=tensorflow")
    self.session = onnx_session(path, threads)
    self.input_name = self.session.get_inputs()[0].name
    self.metadata = metadata
    self.identity = {"weights": "onnx:" + fingerprints.file_digest(path),
                     "step": metadata.get("step")}
    self.trainable_variables = []

  @property
  def image_size(self):
    return self.metadata["image_size"]

  def __call__(self, images01, training=False):
    pixels = np.clip(np.round(np.asarray(images01, np.float32) * 255.0), 0, 255)
    return self.session.run(None, {self.input_name: pixels.astype(np.uint8)})[0]

