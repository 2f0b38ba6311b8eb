"""Export to ONNX and LiteRT: each file run by its own runtime in a fresh process that
never imports corinfomax_tf (nor, for the runtimes, needs TensorFlow for the encoder),
against the SavedModel's features on uint8 digits; a converter failure is one line and
the other formats are still written; embed and knn-eval on --runtime=onnx."""

import json
import os
import sys

import numpy as np
import pytest

import helpers

# A fresh process: the SavedModel by TensorFlow, encoder.onnx by onnxruntime,
# encoder.tflite by ai-edge-litert's interpreter, on the same uint8 digits.
COMPARE = r"""
import json, sys
import numpy as np
from sklearn.datasets import load_digits
export = sys.argv[1]
with open(export + "/assets.extra/corinfomax_tf.json") as fh:
  meta = json.load(fh)
size = meta["image_size"]
digits = (load_digits().images[:20] * 15.9).astype("uint8")
index = (np.arange(size) * 8 // size)
pixels = np.repeat(digits[:, index][:, :, index][..., None], 3, -1).astype("uint8")
import onnxruntime
session = onnxruntime.InferenceSession(export + "/encoder.onnx",
                                       providers=["CPUExecutionProvider"])
onnx = session.run(["features"], {"images": pixels})[0]
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=export + "/encoder.tflite")
interpreter.allocate_tensors()
inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
lite = []
for image in pixels:
  interpreter.set_tensor(inp["index"], image[None])
  interpreter.invoke()
  lite.append(interpreter.get_tensor(out["index"])[0])
import tensorflow as tf
want = tf.saved_model.load(export).signatures["serving_default"](
    images=tf.constant(pixels))["features"].numpy()
scale = np.abs(want).max()
print(json.dumps({"onnx": float(np.abs(onnx - want).max() / scale),
                  "litert": float(np.abs(np.stack(lite) - want).max() / scale),
                  "shape": list(want.shape),
                  "imported": sorted(m for m in sys.modules if m.startswith("corinfomax"))}))
"""


def _compare(export):
  result = helpers.run([sys.executable, "-c", COMPARE, export], capture_output=True,
                          text=True, env=helpers.ENV, cwd="/", timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_converter_failure_is_one_line_and_the_other_format_is_written(tmp_path,
                                                                         monkeypatch):
  from corinfomax_tf.export import runtimes

  def broken(model, path, size):
    raise NotImplementedError("op Foo")
  monkeypatch.setattr(runtimes, "_write_onnx", broken)
  lines = []
  backbone = helpers.tiny_backbone("vit")
  metadata = {"image_size": 8, "normalization": {"mean": [0.5] * 3, "std": [0.2] * 3}}
  files = runtimes.write_runtime_files(backbone, metadata, str(tmp_path), log=lines.append)
  assert files["onnx"] == {"error": "NotImplementedError: op Foo"}
  assert files["litert"] == "encoder.tflite" and os.path.isfile(tmp_path / "encoder.tflite")
  assert lines == ["warning: no encoder.onnx: the onnx converter cannot handle this "
                   "backbone (NotImplementedError: op Foo); the other formats are written"]
  images = runtimes.check_images(8, count=3)
  want = np.asarray(runtimes.pixel_model(backbone, metadata)(images))
  report = runtimes.check_runtime_files(str(tmp_path), files, images, want, log=lines.append)
  assert report["onnx"] == files["onnx"]
  assert report["litert"]["relative_difference"] < runtimes.TOLERANCE
  # The export's line and metadata say what is missing and why.
  from corinfomax_tf.export import saved_model
  (tmp_path / "assets.extra").mkdir()
  (tmp_path / saved_model.METADATA_FILE).write_text(json.dumps({
      "format": saved_model.FORMAT, "runtimes": report,
      "files": ["saved_model.pb", "variables/", "encoder.tflite", "preset/"]}))
  assert saved_model.files_line(str(tmp_path)) == (
      "Files: saved_model.pb, variables/, encoder.tflite, preset/; not written: "
      "encoder.onnx (NotImplementedError: op Foo)")
  # Past the tolerance the export stops, naming the file and the way out.
  from corinfomax_tf import errors
  with pytest.raises(errors.ExportError, match=r"encoder.tflite: ai-edge-litert gives "
                     r"features .* above the tolerance 0.0001; skip it with --nolitert"):
    runtimes.check_runtime_files(str(tmp_path), files, images, want + 1.0)


@pytest.mark.slow
def test_the_smoke_export_runs_in_onnxruntime_and_litert_as_the_savedmodel(trained, tmp_path):
  _, export = trained
  with open(os.path.join(export, "assets.extra", "corinfomax_tf.json")) as fh:
    recorded = json.load(fh)["runtimes"]
  assert recorded["onnx"]["relative_difference"] < 1e-4
  assert recorded["litert"]["relative_difference"] < 1e-4
  got = _compare(export)
  assert got["onnx"] < 1e-4 and got["litert"] < 1e-4 and got["imported"] == [], got
  knn = helpers.run_command("corinfomax_tf.knn_eval", f"--encoder={export}",
                            "--dataset=digits", "--k=5", "--runtime=onnx",
                            f"--workdir={tmp_path}/knn")
  assert knn.returncode == 0, knn.stderr[-3000:]
  result = json.loads(knn.stdout.strip().splitlines()[-1])
  assert result["runtime"] == "onnx" and result["k5_top1"] > 10.0
  embed = helpers.run_command("corinfomax_tf.embed", f"--encoder={export}",
                              "--dataset=digits", "--max_images=40", "--runtime=onnx",
                              f"--workdir={tmp_path}/embed")
  assert embed.returncode == 0, embed.stderr[-3000:]
  with np.load(tmp_path / "embed" / "embeddings.npz") as saved:
    assert saved["features"].shape == (40, 32)


@pytest.mark.slow
def test_a_vit_exports_to_both_runtimes(tmp_path):
  vit = helpers.write_backbone_config(tmp_path / "vit.json", "vit")
  train = helpers.run_command("corinfomax_tf.train", f"--flagfile={helpers.SMOKE}",
                              f"--backbone_config={vit}", f"--workdir={tmp_path}/run",
                              "--epochs=1", "--probe_epochs=0", "--export",
                              "--export_runtimes")
  assert train.returncode == 0, train.stderr[-3000:]
  got = _compare(str(tmp_path / "run" / "export"))
  assert got["onnx"] < 1e-4 and got["litert"] < 1e-4 and got["shape"] == [20, 16], got
