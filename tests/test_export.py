"""Encoder export: reload in a fresh process, signatures, fine-tuning, bad input."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf.export import saved_model as export_lib
from tests import helpers
from corinfomax_tf import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.cfg")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def run(*args, timeout=300):
  return helpers.run([sys.executable, *args], capture_output=True, text=True,
                        timeout=timeout, env=ENV, cwd=ROOT)


def test_export_layout_and_metadata(trained):
  workdir, export_dir = trained
  assert os.path.islink(export_dir)
  assert os.path.realpath(export_dir) == os.path.realpath(
      os.path.join(workdir, "export.steps", "6"))
  meta = export_lib.read_metadata(export_dir)
  assert meta["step"] == 6 and meta["image_size"] == 8
  assert meta["architecture"] == {"depth": 18, "stem": "cifar", "width": 4, "feature_dim": 32,
                                  "output": "feature map, average-pooled",
                                  "input_size": None}
  assert meta["config"]["loss"]["alpha"] == 50
  # The trained fixture's export runs both converters on our ResNet.
  assert meta["files"] == ["saved_model.pb", "variables/", "assets.extra/corinfomax_tf.json",
                           "encoder.onnx", "encoder.tflite", "preset/"]
  assert export_lib.files_line(export_dir) == "Files: " + ", ".join(meta["files"])


def test_fresh_process_gives_the_live_features_for_batches_of_1_and_7(trained, tmp_path):
  workdir, export_dir = trained
  encoder, config, step, _ = export_lib.restore_encoder(workdir)
  mean = np.array(config["data"]["mean"], np.float32)
  std = np.array(config["data"]["std"], np.float32)
  rs = np.random.RandomState(0)
  for batch in (1, 7):
    images = rs.randint(0, 256, (batch, 8, 8, 3)).astype(np.uint8)
    np.save(tmp_path / f"images{batch}.npy", images)
  script = f"""
import json, sys, numpy as np, tensorflow as tf
m = tf.saved_model.load({export_dir!r})
out = {{}}
for batch in (1, 7):
  x = np.load({str(tmp_path)!r} + f"/images{{batch}}.npy")
  out[f"serving{{batch}}"] = m.signatures["serving_default"](images=tf.constant(x))["features"].numpy().tolist()
  out[f"float{{batch}}"] = m.serve_float(tf.constant(x.astype(np.float32) / 255.0))["features"].numpy().tolist()
  maps = m.feature_maps(tf.constant(x.astype(np.float32) / 255.0))
  out[f"maps{{batch}}"] = {{k: list(v.shape) for k, v in maps.items()}}
out["signatures"] = sorted(m.signatures)
out["metadata_step"] = json.loads(m.metadata().numpy())["step"]
print(json.dumps(out))
"""
  result = run("-c", script)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["signatures"] == ["call_inference", "call_training", "feature_maps",
                               "metadata", "serve_float", "serving_default"]
  assert out["metadata_step"] == step == 6
  for batch in (1, 7):
    images = np.load(tmp_path / f"images{batch}.npy")
    live = np.mean(encoder((images.astype(np.float32) / 255.0 - mean) / std,
                           training=False), axis=(1, 2))
    np.testing.assert_allclose(np.array(out[f"serving{batch}"]), live, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(out[f"float{batch}"]), live, rtol=1e-5, atol=1e-6)
    assert out[f"maps{batch}"]["P5"] == [batch, 1, 1, 32]
    assert out[f"maps{batch}"]["P2"] == [batch, 8, 8, 4]


PRESET_SCRIPT = """
import json, os, sys
import numpy as np
import keras, keras_hub
import corinfomax_tf.models.backbone  # registers the class
preset = sys.argv[1]
backbone = keras_hub.models.Backbone.from_preset(preset)
meta = json.load(open(os.path.join(preset, "metadata.json")))["corinfomax_tf"]
mean = np.array(meta["normalization"]["mean"], "float32")
std = np.array(meta["normalization"]["std"], "float32")
images = np.load(sys.argv[2])
maps = backbone((images - mean) / std, training=False)
pooled = keras.ops.convert_to_numpy(keras.ops.mean(maps, axis=(1, 2)))
keras.utils.set_random_seed(0)
classifier = keras_hub.models.ImageClassifier(backbone=backbone, num_classes=3)
classifier.compile(optimizer=keras.optimizers.SGD(0.1),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = (np.random.RandomState(0).rand(12, 8, 8, 3).astype("float32") - mean) / std
history = classifier.fit(x, np.arange(12) % 3, epochs=3, batch_size=6, verbose=0)
print(json.dumps(dict(backend=keras.config.backend(), pooled=pooled.tolist(),
                      losses=history.history["loss"], step=meta["step"])))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_preset_loads_in_keras_hub_on_every_backend(trained, tmp_path, backend):
  # A fresh process on each backend: keras_hub.models.Backbone.from_preset, the
  # pooled features equal to the SavedModel's, an ImageClassifier that trains.
  _, export_dir = trained
  images = np.random.RandomState(3).rand(5, 8, 8, 3).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  result = helpers.run(
      [sys.executable, "-c", PRESET_SCRIPT, os.path.join(export_dir, "preset"),
       str(tmp_path / "images.npy")], capture_output=True, text=True, timeout=300,
      env=dict(ENV, KERAS_BACKEND=backend), cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["backend"] == backend and out["step"] == 6
  loaded = tf.saved_model.load(export_dir)
  want = loaded.call_inference(tf.constant(images)).numpy()
  np.testing.assert_allclose(np.array(out["pooled"]), want, rtol=1e-4, atol=1e-4)
  assert out["losses"][-1] < out["losses"][0], out["losses"]


def test_keras_hub_retinanet_takes_the_preset_directly(trained):
  import keras_hub
  _, export_dir = trained
  backbone, metadata = export_lib.load_preset(export_dir)
  assert metadata["architecture"]["stem"] == "cifar"
  # CIFAR stem: levels 0..3 (strides 1..8), as keras-hub names them.
  assert sorted(backbone.pyramid_outputs) == ["P0", "P1", "P2", "P3"]
  retinanet = keras_hub.models.RetinaNetBackbone(
      image_encoder=backbone, min_level=2, max_level=4, use_p5=False,
      image_shape=(32, 32, 3))
  outputs = retinanet(np.zeros((1, 32, 32, 3), np.float32))
  assert {k: tuple(v.shape[1:3]) for k, v in outputs.items()} == {
      "P2": (8, 8), "P3": (4, 4), "P4": (2, 2)}


def test_fine_tuning_through_the_loaded_savedmodel(trained):
  _, export_dir = trained
  loaded = tf.saved_model.load(export_dir)
  variables = list(loaded.trainable_variables)
  before = [v.numpy().copy() for v in variables]
  rs = np.random.RandomState(1)
  x = tf.constant(rs.rand(16, 8, 8, 3).astype(np.float32))
  y = tf.constant(rs.randint(0, 2, 16))
  import keras
  head = keras.layers.Dense(2)
  head.build((None, 32))
  opt = keras.optimizers.SGD(0.05, momentum=0.9)
  all_vars = variables + head.trainable_variables
  opt.build(all_vars)
  losses = []
  for _ in range(15):
    with tf.GradientTape() as tape:
      logits = head(loaded.call_training(x))
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.cast(y, tf.int32), logits=logits))
    grads = tape.gradient(loss, all_vars)
    assert all(g is not None for g in grads[:len(variables)])  # reaches every weight
    opt.apply(grads, all_vars)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  changed = sum(not np.allclose(b, v.numpy()) for b, v in zip(before, variables))
  assert changed == len(variables)


def test_tfsm_layer_wraps_the_export_as_a_trainable_keras_layer(trained):
  import keras
  _, export_dir = trained
  layer = keras.layers.TFSMLayer(export_dir, call_endpoint="call_inference",
                                 call_training_endpoint="call_training", trainable=True)
  model = keras.Sequential([keras.Input((8, 8, 3)), layer, keras.layers.Dense(2)])
  model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  before = [w.numpy().copy() for w in layer.trainable_weights]
  x = np.random.RandomState(2).rand(8, 8, 8, 3).astype(np.float32)
  model.fit(x, np.arange(8) % 2, epochs=1, verbose=0)
  assert len(before) > 10
  assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, layer.trainable_weights))


def test_bad_export_input_is_named_and_nothing_is_overwritten(trained, tmp_path):
  workdir, export_dir = trained
  # The same step again: refused, the existing export untouched.
  target = os.path.realpath(export_dir)
  mtime = os.path.getmtime(os.path.join(target, "saved_model.pb"))
  result = run("export/export_encoder.py", f"--workdir={workdir}", f"--export_dir={export_dir}")
  assert result.returncode == 2 and "step 6 is already exported" in result.stderr
  assert os.path.getmtime(os.path.join(target, "saved_model.pb")) == mtime
  # An export_dir that is somebody else's directory.
  other = tmp_path / "not_ours"
  other.mkdir()
  (other / "precious.txt").write_text("keep")
  result = run("export/export_encoder.py", f"--workdir={workdir}", f"--export_dir={other}")
  assert result.returncode == 2 and "is not an export link" in result.stderr.splitlines()[-1]
  assert (other / "precious.txt").read_text() == "keep"
  # A workdir with no checkpoint.
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  result = run("export/export_encoder.py", f"--workdir={empty}", f"--export_dir={tmp_path}/e")
  assert result.returncode == 2 and "holds no checkpoint" in result.stderr.splitlines()[-1]
  with pytest.raises(errors.ExportError, match="not a corinfomax_tf encoder export"):
    export_lib.read_metadata(str(other))


def test_evaluation_commands_reject_mismatched_input(trained, tmp_path):
  _, export_dir = trained
  # Another size than training's is taken as asked, with one line (left out: the
  # encoder's, read from its metadata).
  result = run("-m", "corinfomax_tf.knn_eval", f"--encoder={export_dir}", "--dataset=digits",
               "--image_size=16", f"--workdir={tmp_path}/knn16", "--k=5")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--image_size=16: the encoder was trained at 8; using 16 as asked" in result.stdout
  # --output_dir, the old name of --workdir, still works, with one line.
  result = run("-m", "corinfomax_tf.knn_eval", f"--encoder={export_dir}", "--dataset=digits",
               f"--output_dir={tmp_path}/knn", "--k=5")
  assert result.returncode == 0 and "trained at" not in result.stdout
  assert json.loads(result.stdout.strip().splitlines()[-1])["num_test"] == 360
  assert os.path.isfile(f"{tmp_path}/knn/knn_eval.json")
  assert [line for line in result.stderr.splitlines() if "deprecated" in line] == [
      f"warning: --output_dir is deprecated: it is the old name of --workdir; "
      f"use --workdir={tmp_path}/knn"]
  result = run("-m", "corinfomax_tf.linear_eval", f"--encoder={export_dir}",
               "--dataset=digits", "--image_size=8", "--num_classes=5",
               f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert "--num_classes=5: --dataset=digits has 10 classes" in result.stderr.splitlines()[-1]
  result = run("-m", "corinfomax_tf.linear_eval", f"--encoder={tmp_path}/none",
               "--dataset=digits", "--image_size=8")
  assert result.returncode == 2 and "does not exist" in result.stderr.splitlines()[-1]
  result = run("-m", "corinfomax_tf.linear_eval", f"--encoder={export_dir}",
               "--dataset=digits", "--image_size=8", "--precompute_features")
  assert result.returncode == 2
  assert "--precompute_features=True: requires --noaugment" in result.stderr.splitlines()[-1]


def test_linear_eval_and_knn_beat_chance_on_generated_images(trained, tmp_path):
  from corinfomax_tf import config
  from corinfomax_tf.data import datasets as data_lib
  from corinfomax_tf.evaluation import knn
  from corinfomax_tf.evaluation import linear
  _, export_dir = trained
  root = helpers.write_image_folder(str(tmp_path / "images"), classes=3, per_class=20,
                                    size=(12, 12))
  encoder = export_lib.load_encoder(export_dir)
  source = data_lib.load_source("folder", image_size=8, data_dir=root)
  result = knn.run_knn_eval(encoder, source, image_size=8, ks=(5, 20))
  assert result["k5_top1"] > 80 and result["k20_top1"] > 80   # chance: 33%
  data = config.DataConfig(dataset="folder", data_dir=root, image_size=8)
  cfg = config.LinearEvalConfig(encoder=export_dir, workdir=str(tmp_path / "lin"),
                                data=data, epochs=30, batch_size=16, lr=0.2,
                                eval_every_epochs=30)
  result = linear.run_linear_eval(encoder, source, cfg, log=lambda m: None)
  assert result["top1"] > 80, result
  fast = linear.run_linear_eval(
      encoder, source, dataclasses.replace(cfg, workdir=str(tmp_path / "fast"),
                                           augment=False, precompute_features=True),
      log=lambda m: None)
  assert fast["top1"] > 80 and "not the paper" in fast["protocol"]
