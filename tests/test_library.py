"""The package as a library: install, console script, Python API, any backbone.

Quick tests run in-process; the slow ones build a wheel, install it into a folder and
run it from another directory, train keras-hub backbones built from configs (a
2-layer ViT, a small MobileNet), export them, reload their presets in fresh processes
and evaluate them, and execute the README's Python example.
"""

import json
import os
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

import helpers
from corinfomax_tf import errors
from corinfomax_tf.models import factory
from corinfomax_tf.models import pooling

ROOT = helpers.ROOT
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


# ----------------------------------------------------------------------------
# Quick: pooling, backbone checks, the console script's dispatch, the API.
# ----------------------------------------------------------------------------


def _functional(output):
  import keras
  inputs = keras.Input((8, 8, 3))
  return keras.Model(inputs, output(inputs))


def test_pooling_by_output_kind():
  import keras
  x = np.arange(2 * 8 * 8 * 3, dtype="float32").reshape(2, 8, 8, 3) / 100.0
  feature_map = _functional(lambda t: keras.layers.Conv2D(
      4, 1, kernel_initializer="ones")(t))
  tokens = _functional(lambda t: keras.layers.Reshape((16, 12))(
      keras.layers.Conv2D(12, 2, strides=2, kernel_initializer="ones")(t)))
  vector = _functional(lambda t: keras.layers.Dense(5)(keras.layers.Flatten()(t)))
  want_map = np.asarray(feature_map(x)).mean(axis=(1, 2))
  np.testing.assert_allclose(pooling.pooled_model(feature_map)(x), want_map, rtol=1e-6)
  seq = np.asarray(tokens(x))
  np.testing.assert_allclose(pooling.pooled_model(tokens)(x), seq.mean(axis=1), rtol=1e-6)
  tokens.use_class_token = True
  np.testing.assert_allclose(pooling.pooled_model(tokens)(x), seq[:, 0], rtol=1e-6)
  np.testing.assert_allclose(pooling.pooled_model(vector)(x), vector(x), rtol=1e-6)
  assert [pooling.feature_dim(m) for m in (feature_map, tokens, vector)] == [4, 12, 5]
  assert pooling.describe(tokens) == "tokens, class token"


def test_vit_pools_its_class_token():
  vit = helpers.tiny_backbone("vit")
  assert pooling.has_class_token(vit) and pooling.feature_dim(vit) == 16
  x = tf.random.stateless_uniform([2, 8, 8, 3], seed=[1, 2])
  np.testing.assert_allclose(pooling.pooled_model(vit)(x), np.asarray(vit(x))[:, 0],
                             rtol=1e-6)


def test_a_backbone_of_another_input_size_is_one_line():
  with pytest.raises(errors.ConfigError, match=r"--image_size=16: .* takes 8x8 images"):
    factory.check_input_size(helpers.tiny_backbone("vit"), 16, "vit.json",
                             "--backbone_config")


def test_backbone_config_files_are_checked(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(errors.ConfigError, match=r"--backbone_config=.*bad.json: not JSON"):
    factory.read_backbone_config(str(bad))
  other = tmp_path / "other.json"
  other.write_text('{"layers": []}')
  with pytest.raises(errors.ConfigError, match="not a serialized Keras object"):
    factory.read_backbone_config(str(other))
  with pytest.raises(errors.ConfigError, match="cannot be read"):
    factory.read_backbone_config(str(tmp_path / "missing.json"))


def test_a_serialized_backbone_rebuilds_the_same_architecture(tmp_path):
  path = helpers.write_backbone_config(tmp_path / "mobilenet.json", "mobilenet")
  built = factory.build({"backbone": "resnet", "backbone_config": path}, image_size=8)
  arch = factory.architecture(built)
  assert arch["backbone"] == "MobileNetBackbone" and arch["feature_dim"] == 32
  again = factory.encoder_from_architecture(json.loads(json.dumps(arch)))
  assert factory.same_architecture(factory.architecture(again), arch)
  assert not factory.same_architecture(
      factory.architecture(factory.encoder(18, "cifar", 4)), arch)
  assert again.count_params() == built.count_params()


def test_console_script_dispatches_and_names_a_bad_command(capsys, monkeypatch):
  from corinfomax_tf.cli import main
  assert main.main(["corinfomax"]) == 0
  usage = capsys.readouterr().out
  for name in ("train", "export", "linear-eval", "knn-eval", "finetune", "detect", "embed",
               "benchmark", "data-service"):
    assert f"\n  {name} " in usage
  assert main.main(["corinfomax", "trian"]) == 2
  assert "error: unknown command 'trian'" in capsys.readouterr().err
  called = []
  from corinfomax_tf.cli import knn_eval
  monkeypatch.setattr(knn_eval, "run", lambda: called.append(list(sys.argv)))
  assert main.main(["corinfomax", "knn-eval", "--encoder=x"]) == 0
  assert called == [["corinfomax knn-eval", "--encoder=x"]]


def test_packaged_flagfiles_are_found_from_any_directory(tmp_path, monkeypatch):
  from corinfomax_tf import flags as flags_lib
  monkeypatch.chdir(tmp_path)
  found = flags_lib.packaged_flagfile("configs/smoke.cfg")
  assert os.path.isfile(found) and found.endswith(os.path.join("configs", "smoke.cfg"))
  assert flags_lib.packaged_flagfile("configs/none.cfg") == "configs/none.cfg"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "smoke.cfg").write_text("--epochs=1\n")
  assert flags_lib.packaged_flagfile("configs/smoke.cfg") == "configs/smoke.cfg"


def test_compile_auto_sizes_the_paper_schedule_at_fit():
  import corinfomax_tf
  images = tf.data.Dataset.from_tensor_slices(
      np.random.RandomState(0).randint(0, 256, (12, 10, 10, 3)).astype("uint8"))
  model = corinfomax_tf.CorInfoMax(
      corinfomax_tf.CorInfoMaxBackbone(depth=18, width=2, image_size=8), projector="8-4",
      loss={"alpha": 10.0})
  model.compile(warmup_epochs=1)
  assert model.optimizer.built
  views = corinfomax_tf.two_views(images, image_size=8, batch_size=4)
  history = model.fit(views, epochs=2, steps_per_epoch=3, verbose=0)
  schedule = model.optimizer.learning_rate_schedule if hasattr(
      model.optimizer, "learning_rate_schedule") else model.optimizer._learning_rate
  assert (schedule.total_steps, schedule.warmup_steps) == (6, 3)
  assert int(model.step_counter.numpy()) == 6
  assert np.isfinite(history.history["loss"]).all()
  with pytest.raises(ValueError, match="steps_per_epoch"):
    model.compile()
    model.fit(views, epochs=1, verbose=0)


def test_two_views_takes_pairs_dicts_and_floats():
  import corinfomax_tf
  rs = np.random.RandomState(0)
  uint8 = rs.randint(0, 256, (6, 12, 10, 3)).astype("uint8")
  forms = [tf.data.Dataset.from_tensor_slices(uint8),
           tf.data.Dataset.from_tensor_slices((uint8, np.arange(6))),
           tf.data.Dataset.from_tensor_slices({"image": uint8[..., :1],
                                               "label": np.arange(6)}),
           tf.data.Dataset.from_tensor_slices(uint8.astype("float32") / 255.0)]
  for ds in forms:
    views, labels = next(iter(corinfomax_tf.two_views(ds, image_size=8, batch_size=4)))
    assert views.shape == (4, 2, 8, 8, 3) and labels.shape == (4,)
  with pytest.raises(ValueError, match="unbatch"):
    corinfomax_tf.two_views(forms[0].batch(2), image_size=8, batch_size=4)


def test_pretrain_refuses_unknown_settings(tmp_path):
  import corinfomax_tf
  images = tf.data.Dataset.from_tensor_slices(np.zeros((4, 8, 8, 3), "uint8"))
  with pytest.raises(ValueError, match=r"Unknown settings \['lrr'\]"):
    corinfomax_tf.pretrain(helpers.tiny_backbone("vit"), images, workdir=str(tmp_path),
                           image_size=8, epochs=1, batch_size=2, lrr=0.1)
  with pytest.raises(errors.ConfigError, match="--lr=-1"):
    corinfomax_tf.pretrain(helpers.tiny_backbone("vit"), images, workdir=str(tmp_path),
                           image_size=8, epochs=1, batch_size=2, lr=-1)


# ----------------------------------------------------------------------------
# Slow: the wheel, keras-hub backbones end to end, the README's example.
# ----------------------------------------------------------------------------

# Run in a fresh process that never imports corinfomax_tf: the export's SavedModel
# and its keras-hub preset give the same pooled features on uint8 digits.
COMPARE = r"""
import json, sys
import numpy as np, tensorflow as tf, keras_hub
from sklearn.datasets import load_digits
export = sys.argv[1]
with open(export + "/assets.extra/corinfomax_tf.json") as fh:
  meta = json.load(fh)
size = meta["image_size"]
digits = (load_digits().images[:32] * 15.9).astype("uint8")
pixels = tf.image.resize(np.repeat(digits[..., None], 3, -1), (size, size),
                         method="nearest").numpy().astype("uint8")
want = tf.saved_model.load(export).signatures["serving_default"](
    images=tf.constant(pixels))["features"].numpy()
backbone = keras_hub.models.Backbone.from_preset(export + "/preset")
mean, std = (np.array(meta["normalization"][k], "float32") for k in ("mean", "std"))
out = np.asarray(backbone((pixels.astype("float32") / 255.0 - mean) / std, training=False))
pooled = out[:, 0] if out.ndim == 3 else out.mean(axis=(1, 2))
print(json.dumps({"relative_difference": float(np.abs(pooled - want).max() /
                                               np.abs(want).max()),
                  "features": want.tolist(),
                  "corinfomax_imported": any(m.startswith("corinfomax") for m in sys.modules)}))
"""


def _run(args, cwd, env=ENV, timeout=400):
  result = helpers.run(args, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)
  assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
  return result


def _compare(export, cwd, env=ENV):
  out = _run([sys.executable, "-c", COMPARE, export], cwd, env)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_wheel_installed_in_a_folder_trains_a_vit_and_exports_it(tmp_path):
  """The issue's 'done when': a wheel installed with --no-deps --target DIR, used
  from another directory with only DIR and the dependencies on the path."""
  wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
  work.mkdir()
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(wheels), ROOT], cwd=str(tmp_path))
  wheel = next(p for p in os.listdir(wheels) if p.endswith(".whl"))
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
        str(wheels / wheel)], cwd=str(tmp_path))
  env = dict(ENV, PYTHONPATH=str(target))
  where = _run([sys.executable, "-c", "import corinfomax_tf; print(corinfomax_tf.__file__)"],
               str(work), env)
  assert where.stdout.strip().startswith(str(target)), where.stdout
  usage = _run([str(target / "bin" / "corinfomax"), "--help"], str(work), env)
  assert "linear-eval" in usage.stdout
  vit = helpers.write_backbone_config(work / "vit.json", "vit")
  train = _run([sys.executable, "-m", "corinfomax_tf.train", "--flagfile=configs/smoke.cfg",
                f"--backbone_config={vit}", "--workdir=run", "--export",
                "--probe_epochs=0"], str(work), env)
  assert "reload check passed" in train.stdout
  export = str(work / "run" / "export")
  got = _compare(export, str(work), env)
  assert got["relative_difference"] < 1e-4 and not got["corinfomax_imported"]
  with open(os.path.join(export, "assets.extra", "corinfomax_tf.json")) as fh:
    assert json.load(fh)["architecture"]["output"] == "tokens, class token"
  linear = _run([sys.executable, "-m", "corinfomax_tf.linear_eval", f"--encoder={export}",
                 "--dataset=digits", "--image_size=8", "--epochs=1", "--noaugment"],
                str(work), env)
  result = json.loads(linear.stdout.strip().splitlines()[-1])
  assert result["top1"] > 10.0 and result["num_classes"] == 10
  _run([sys.executable, "-m", "corinfomax_tf.embed", f"--encoder={export}",
        "--dataset=digits", "--max_images=64", "--workdir=embed"], str(work), env)
  with np.load(work / "embed" / "embeddings.npz") as saved:
    assert saved["features"].shape == (64, 16)
  # Continued pretraining from the exported preset starts from its weights: a step
  # at a learning rate of 1e-30 leaves a ViT (no BatchNorm) where the preset was.
  _run([sys.executable, "-m", "corinfomax_tf.train", "--flagfile=configs/smoke.cfg",
        f"--backbone={export}", "--workdir=continued", "--epochs=1", "--steps_per_epoch=1",
        "--lr=1e-30", "--warmup_start_lr=1e-30", "--min_lr=0", "--weight_decay=0",
        "--export", "--probe_epochs=0"], str(work), env)
  continued = _compare(str(work / "continued" / "export"), str(work), env)
  np.testing.assert_allclose(continued["features"], got["features"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_mobilenet_from_its_config_pretrains_exports_and_evaluates(tmp_path):
  mobilenet = helpers.write_backbone_config(tmp_path / "mobilenet.json", "mobilenet")
  command = [sys.executable, "-m", "corinfomax_tf.train", f"--flagfile={helpers.SMOKE}",
             f"--backbone_config={mobilenet}", f"--workdir={tmp_path}/run", "--probe_epochs=2"]
  first = json.loads(_run(command, str(tmp_path)).stdout.strip().splitlines()[-1])
  assert "export" not in first
  # A finished run asked again with --export is not trained again, but exported.
  train = _run(command + ["--export"], str(tmp_path))
  assert "Already trained: step 6 of 6" in train.stdout and "Exported step 6" in train.stdout
  summary = json.loads(train.stdout.strip().splitlines()[-1])
  assert summary["probe"]["top1"] > 10.0 and summary["export"]
  export = str(tmp_path / "run" / "export")
  got = _compare(export, str(tmp_path))
  assert got["relative_difference"] < 1e-4 and not got["corinfomax_imported"]
  knn = _run([sys.executable, "-m", "corinfomax_tf.knn_eval", f"--encoder={export}",
              "--dataset=digits", "--image_size=8", "--k=5"], str(tmp_path))
  assert json.loads(knn.stdout.strip().splitlines()[-1])["k5_top1"] > 10.0
  finetune = _run([sys.executable, "-m", "corinfomax_tf.finetune", f"--encoder={export}",
                   "--dataset=digits", "--epochs=1", "--batch_size=32",
                   f"--workdir={tmp_path}/finetune"], str(tmp_path))
  # Six pretraining steps and one epoch on 145 labels leave a MobileNet near chance
  # (9-12%): what is checked is that the chain runs on this backbone, from its export.
  tuned = json.loads(finetune.stdout.strip().splitlines()[-1])
  assert 0.0 <= tuned["top1"] <= 100.0 and tuned["num_classes"] == 10
  assert tuned["encoder_step"] == 6 and len(tuned["encoder_weights"]) == 16
  assert tuned["epochs"] == 1
  with open(tmp_path / "finetune" / "finetune.json") as fh:
    assert [h["epoch"] for h in json.load(fh)["history"]] == [1]
  detect = helpers.run([sys.executable, "-m", "corinfomax_tf.detect",
                           f"--encoder={export}", "--epochs=1"], capture_output=True,
                          text=True, cwd=str(tmp_path), env=ENV, timeout=300)
  assert detect.returncode == 2 and "Traceback" not in detect.stderr
  assert "detection builds its feature pyramid from our ResNet" in detect.stderr


def readme_python_example():
  """The README's Python quick start: the ```python block after its heading."""
  with open(os.path.join(ROOT, "README.md")) as fh:
    text = fh.read()
  section = text.split("## Python quick start", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path):
  script = tmp_path / "example.py"
  script.write_text(readme_python_example())
  out = _run([sys.executable, str(script)], str(tmp_path)).stdout
  assert "(4, 32)" in out
  with open(tmp_path / "runs" / "python_vit" / "summary.json") as fh:
    summary = json.load(fh)
  assert summary["step"] == 10 and np.isfinite(summary["final_terms"]["loss"])
