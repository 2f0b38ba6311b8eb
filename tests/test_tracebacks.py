"""Files a third-party parser reads, given broken, are one line naming the file (no
traceback): a COCO file with no images, a cut encoder.onnx, a --backbone_config that
holds no backbone; an export killed mid-write leaves nothing behind for ever."""

import json
import os
import shutil

import keras
import pytest

from corinfomax_tf import errors
from corinfomax_tf.data import detection
from corinfomax_tf.export import runtimes
from corinfomax_tf.export import saved_model
from corinfomax_tf.models import factory

import helpers


def test_a_coco_file_with_no_images_is_one_line(tmp_path):
  path = tmp_path / "empty.json"
  path.write_text(json.dumps({"images": [], "annotations": [],
                              "categories": [{"id": 1, "name": "a"}]}))
  with pytest.raises(errors.DataError, match=f"^--train_annotations={path}: lists no "
                     "images$"):
    detection.read_coco_json(str(path), str(tmp_path))


def test_an_onnx_file_cut_short_is_one_line_naming_it(tmp_path):
  path = tmp_path / "encoder.onnx"
  path.write_bytes(b"\x08\x07\x12\x04cut")
  with pytest.raises(errors.ExportError) as e:
    runtimes.onnx_session(str(path))
  assert str(e.value).startswith(f"{path}: ONNX Runtime cannot load it (")
  assert "export again" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("obj, needle", [
    (keras.optimizers.SGD(), "holds a SGD (SGD), not a backbone"),
    (keras.layers.Dense(3), "holds a Dense (Dense), not a backbone"),
    (keras.Sequential([keras.layers.Dense(3)]), "the Sequential has no defined input"),
])
def test_a_backbone_config_that_holds_no_backbone_is_one_line(tmp_path, obj, needle):
  path = tmp_path / "b.json"
  path.write_text(json.dumps(keras.saving.serialize_keras_object(obj)))
  with pytest.raises(errors.ConfigError) as e:
    factory.build({"backbone_config": str(path)}, image_size=8)
  assert str(e.value).startswith(f"--backbone_config={path}: ") and needle in str(e.value)


def _dead_pid():
  pid = 4_000_000
  while pid > 1000:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return pid
    except OSError:
      pass
    pid -= 1
  raise AssertionError("no free pid")


def test_an_export_killed_mid_write_is_cleaned_up_by_the_next(tmp_path):
  root = tmp_path / "export.steps"
  dead = _dead_pid()
  abandoned = [root / f".tmp-6-{dead}", root / f".tmp-3-{dead}", root / f"6.old-{dead}"]
  for folder in abandoned:
    folder.mkdir(parents=True)
  (root / f".tmp-6-{dead}.lock").write_text("")   # its writer's lock, released
  live = root / f".tmp-9-{os.getpid() + 1}"
  live.mkdir()
  held = saved_model._hold_writer_lock(str(live))   # a live writer's folder
  lines = []
  try:
    saved_model.remove_abandoned(str(root), lines.append)
  finally:
    saved_model._release_writer_lock(held)
  assert sorted(os.listdir(root)) == [live.name]
  assert len(lines) == 3 and all("killed mid-write" in line for line in lines)


@pytest.mark.slow
def test_knn_eval_and_embed_on_a_cut_encoder_onnx_are_one_line(trained, tmp_path):
  _, export_dir = trained
  copy = tmp_path / "copy"
  shutil.copytree(os.path.realpath(export_dir), copy)
  onnx = copy / "encoder.onnx"
  onnx.write_bytes(onnx.read_bytes()[:1000])
  common = [f"--encoder={copy}", "--dataset=digits", "--runtime=onnx"]
  helpers.assert_one_line_errors("corinfomax_tf.knn_eval", [], [
      (common + [f"--workdir={tmp_path / 'k'}"], f"{onnx}: ONNX Runtime cannot load it"),
  ], env=helpers.ENV, cwd=helpers.ROOT)
  helpers.assert_one_line_errors("corinfomax_tf.embed", [], [
      (common + [f"--workdir={tmp_path / 'e'}"], f"{onnx}: ONNX Runtime cannot load it"),
  ], env=helpers.ENV, cwd=helpers.ROOT)


@pytest.mark.slow
def test_a_damaged_savedmodel_is_one_line_naming_the_export(trained, tmp_path):
  _, export_dir = trained
  cases = []
  for name, cut in (("graph", "saved_model.pb"), ("weights", None)):
    copy = tmp_path / name
    shutil.copytree(os.path.realpath(export_dir), copy)
    target = copy / cut if cut else next((copy / "variables").glob("variables.data*"))
    target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 3])
    cases.append(([f"--encoder={copy}", f"--workdir={tmp_path / name}-k"],
                  f"--encoder={copy}: the SavedModel cannot be read ("))
  helpers.assert_one_line_errors("corinfomax_tf.knn_eval", ["--dataset=digits"], cases,
                                 env=helpers.ENV, cwd=helpers.ROOT)
