"""Results that are never silently stale: caches and resumes keyed by content (the
encoder's weights, the image files), and the faults found by trying the commands as a
user would (a missing or BOM-prefixed flagfile, a preset given as --encoder, a busy
port, a data service without workers, malformed COCO files, boxes beyond --max_boxes).

The quick tests run in-process; the slow ones run the commands.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import helpers
from corinfomax_tf import config
from corinfomax_tf import errors
from corinfomax_tf import fingerprints

# ----------------------------------------------------------------------------
# Quick.
# ----------------------------------------------------------------------------


def test_a_missing_flagfile_is_one_line_without_a_doubled_prefix(tmp_path, capsys):
  from corinfomax_tf import flags as flags_lib
  with pytest.raises(SystemExit) as info:
    flags_lib.parse_flags(["train", f"--flagfile={tmp_path}/nope.cfg"])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: --flagfile={tmp_path}/nope.cfg: cannot be read (No such file or directory)"


def test_a_flagfile_with_a_byte_order_mark_is_read_without_it(tmp_path):
  from corinfomax_tf import flags as flags_lib
  path = tmp_path / "windows.cfg"
  path.write_bytes(b"\xef\xbb\xbf--epochs=3\n--batch_size=8\n")
  read = flags_lib._readable_flagfile(str(path))
  assert read != str(path)
  with open(read, "rb") as fh:
    assert fh.read() == b"--epochs=3\n--batch_size=8\n"
  plain = tmp_path / "plain.cfg"
  plain.write_text("--epochs=3\n")
  assert flags_lib._readable_flagfile(str(plain)) == str(plain)


def test_an_image_list_with_a_byte_order_mark_reads_its_first_line(tmp_path):
  from corinfomax_tf.data import image_folder
  for name in ("a.png", "b.png"):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
  listing = tmp_path / "list.txt"
  listing.write_bytes("\ufeffa.png\r\nb.png\r\n".encode("utf-8"))
  assert image_folder.read_image_list(str(listing)) == [str(tmp_path / "a.png"),
                                                        str(tmp_path / "b.png")]


def test_what_an_encoder_path_is_and_a_foreign_preset_is_one_line(tmp_path):
  from corinfomax_tf.export import saved_model
  with pytest.raises(errors.ExportError, match="does not exist"):
    saved_model.encoder_kind(str(tmp_path / "none"))
  preset = tmp_path / "preset"
  preset.mkdir()
  (preset / "config.json").write_text(json.dumps({"class_name": "ViTBackbone",
                                                  "config": {}}))
  (preset / "metadata.json").write_text(json.dumps({"keras_version": "3.15"}))
  assert saved_model.encoder_kind(str(preset)) == "preset"
  with pytest.raises(errors.ExportError, match=r"--encoder=.*preset: a keras-hub preset that "
                     r"no corinfomax_tf export wrote .* --backbone="):
    saved_model.load_encoder(str(preset))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"model": {}, "data": {}}))
  assert saved_model.encoder_kind(str(workdir)) == "workdir"
  (tmp_path / "other").mkdir()
  with pytest.raises(errors.ExportError, match="not a corinfomax_tf encoder export .*, nor its preset, nor a training workdir"):
    saved_model.encoder_kind(str(tmp_path / "other"))


def test_weight_and_file_digests_follow_content_not_paths(tmp_path):
  a = [np.arange(6, dtype="float32").reshape(2, 3), np.ones(3, "float32")]
  b = [a[0].copy(), a[1].copy()]
  assert fingerprints.weights_digest(a) == fingerprints.weights_digest(b)
  b[1][2] = 1.0001
  assert fingerprints.weights_digest(a) != fingerprints.weights_digest(b)
  assert fingerprints.weights_digest(a) != fingerprints.weights_digest([a[0].reshape(3, 2), a[1]])

  from corinfomax_tf.data import image_folder
  for name in ("a.png", "b.png"):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)

  def digest():
    scan = image_folder.scan_unlabeled_images(str(tmp_path), workers=1)
    return fingerprints.files_digest([scan])
  first = digest()
  assert digest() == first
  os.remove(tmp_path / "b.png")
  removed = digest()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
  os.utime(tmp_path / "b.png", ns=(1, 1))
  assert len({first, removed, digest()}) == 3


def test_a_workdir_computed_from_other_weights_is_refused(tmp_path):
  from corinfomax_tf.training import epochs
  cfg = config.LinearEvalConfig(encoder="runs/x/export", workdir=str(tmp_path / "eval"),
                                data=config.DataConfig())
  with epochs.EpochRun.open(cfg, command="test", result_file="r.json", log=lambda _: None,
                            encoder={"weights": "aaaa", "step": 6}) as run:
    run.finish({"top1": 50.0})
  # The same weights (under any path) are the same result.
  with epochs.EpochRun.open(cfg, command="test", result_file="r.json", log=lambda _: None,
                            encoder={"weights": "aaaa", "step": 6}) as run:
    assert run.finished["top1"] == 50.0
  with pytest.raises(errors.ConfigError) as info:
    with epochs.EpochRun.open(cfg, command="test", result_file="r.json", log=lambda _: None,
                              encoder={"weights": "bbbb", "step": 12}):
      pass
  assert str(info.value) == (
      f"--encoder=runs/x/export: holds other weights (step 12) than the encoder the "
      f"workdir {tmp_path}/eval was computed from (step 6); use a new --workdir for this "
      "encoder, or the same encoder")


def _write_coco(tmp_path, coco):
  folder = tmp_path / "images"
  folder.mkdir(exist_ok=True)
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(folder / "a.png")
  base = {"images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
          "annotations": [], "categories": [{"id": 3, "name": "cat"}]}
  base.update(coco)
  path = tmp_path / "ann.json"
  path.write_text(json.dumps(base))
  return str(path), str(folder)


@pytest.mark.parametrize("coco, needle", [
    ({"categories": [{"name": "cat"}]}, "category entry {'name': 'cat'} lacks an integer id"),
    ({"categories": ["cat"]}, "category entry 'cat' lacks an integer id"),
    ({"images": ["a.png"]}, "image entry 'a.png' lacks id, file_name, width or height"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 40}]},
     "image 1 (a.png): width and height must be positive, not 0x40"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}] * 2},
     "image id 1 is listed twice"),
    ({"annotations": [[1, 2, 3]]}, "annotation entry [1, 2, 3] is not an object"),
    ({"annotations": [{"id": 4, "image_id": [1], "category_id": 3, "bbox": [1, 1, 2, 2]}]},
     "annotation 4: image_id [1] is not in 'images'"),
    ({"annotations": [{"id": 4, "image_id": 1, "category_id": [3], "bbox": [1, 1, 2, 2]}]},
     "annotation 4 (a.png): category_id [3] is not one of the categories [3]"),
    ({"annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, "NaN", 2, 2]}]},
     "annotation 4 (a.png): box [1, nan, 2, 2] is not finite"),
    ({"annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2]}]},
     "annotation 4 (a.png): bbox must be [x, y, width, height]"),
])
def test_malformed_coco_entries_are_one_line_naming_the_entry(tmp_path, coco, needle):
  from corinfomax_tf.data import detection
  ann, folder = _write_coco(tmp_path, coco)
  with pytest.raises(errors.DataError) as info:
    detection.read_coco_json(ann, folder)
  assert str(info.value).startswith(f"--train_annotations={ann}: {needle}"), str(info.value)


def test_boxes_beyond_max_boxes_are_counted(tmp_path):
  from corinfomax_tf.data import detection
  boxes = [{"id": k, "image_id": 1, "category_id": 3, "bbox": [k, k, 4, 4]} for k in range(5)]
  ann, folder = _write_coco(tmp_path, {"annotations": boxes})
  source = detection.coco_json_source(ann, folder, ann, folder, image_size=16, max_boxes=2)
  want = {"boxes": 3, "images": 1, "most_in_one_image": 5}
  assert source.dropped_boxes == {"train": want, "test": want}
  assert detection.coco_json_source(ann, folder, ann, folder, image_size=16,
                                    max_boxes=5).dropped_boxes == {}


# ----------------------------------------------------------------------------
# Slow: the commands.
# ----------------------------------------------------------------------------


def _last_json(result):
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reruns_answer_for_the_encoder_and_images_they_are_given(trained, tmp_path):
  """linear_eval and embed after the export link moved to a newer step, embed after
  images were deleted, and the export's preset folder given as --encoder."""
  workdir, _ = trained
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run, symlinks=True)
  export = os.path.join(run, "export")   # a relative link: the copy's own export
  assert os.path.realpath(export).startswith(run)
  linear = ["corinfomax_tf.linear_eval", f"--encoder={export}", "--dataset=digits",
            "--epochs=1", "--noaugment", f"--workdir={tmp_path}/linear"]
  first = helpers.run_command(*linear)
  assert first.returncode == 0, first.stderr[-3000:]
  photos = helpers.write_image_tree(str(tmp_path / "photos"), count=6)
  embed = ["corinfomax_tf.embed", f"--encoder={export}", "--dataset=images",
           f"--data_dir={photos}", f"--workdir={tmp_path}/embed"]
  assert helpers.run_command(*embed).returncode == 0
  again = helpers.run_command(*embed)
  assert "Reusing the 6 embeddings" in again.stdout, again.stdout[-2000:]
  # A deleted image is noticed: embedded again, and no longer among the paths.
  gone = os.path.join("trip_0", "photo_0.png")
  os.remove(os.path.join(photos, gone))
  fewer = helpers.run_command(*embed)
  assert "Reusing" not in fewer.stdout and "Embedded 5 images" in fewer.stdout
  with np.load(tmp_path / "embed" / "embeddings.npz") as saved:
    assert not any(p.endswith(gone) for p in saved["paths"])
  # The export's preset folder is the export (no traceback, the same encoder).
  knn = helpers.run_command("corinfomax_tf.knn_eval", f"--encoder={export}/preset",
                            "--dataset=digits", "--k=5", f"--workdir={tmp_path}/knn")
  assert knn.returncode == 0 and "Traceback" not in knn.stderr, knn.stderr[-3000:]
  # Train on, export: the link now points at another step with other weights.
  longer = helpers.run_command("corinfomax_tf.train", f"--flagfile={run}/flags.cfg",
                               f"--workdir={run}", "--extend_epochs=1", "--export",
                               "--noexport_runtimes")
  assert longer.returncode == 0, longer.stderr[-3000:]
  refused = helpers.run_command(*linear)
  assert refused.returncode == 2 and "Traceback" not in refused.stderr
  last = refused.stderr.strip().splitlines()[-1]
  assert last == (f"error: --encoder={export}: holds other weights (step 9) than the "
                  f"encoder the workdir {tmp_path}/linear was computed from (step 6); use "
                  "a new --workdir for this encoder, or the same encoder"), last
  newer = helpers.run_command(*embed)
  assert "Reusing" not in newer.stdout and "Embedded 5 images" in newer.stdout


def _service(*args):
  return helpers.popen([sys.executable, "-m", "corinfomax_tf.data_service", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=helpers.ENV, cwd=helpers.ROOT)


@pytest.mark.slow
def test_a_data_service_without_workers_says_so_and_honours_sigterm(tmp_path):
  root = helpers.write_image_tree(str(tmp_path / "photos"), count=24)
  port = helpers.free_port()
  dispatcher = _service("--role=dispatcher", f"--port={port}")
  try:
    time.sleep(4)
    busy = helpers.run_command("corinfomax_tf.data_service", "--role=dispatcher",
                               f"--port={port}")
    assert busy.returncode == 2 and busy.stderr.strip().splitlines()[-1].startswith(
        f"error: --port={port}: in use")
    trainer = helpers.popen(
        [sys.executable, "-m", "corinfomax_tf.train", f"--flagfile={helpers.SMOKE}",
         f"--workdir={tmp_path}/run", "--dataset=images", f"--data_dir={root}",
         "--image_size=12", "--steps_per_epoch=0", "--probe_epochs=0", "--preview_images=0",
         f"--data_service=grpc://localhost:{port}"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=helpers.ENV, cwd=helpers.ROOT)
    lines, deadline = [], time.time() + 120
    while time.time() < deadline:
      line = trainer.stdout.readline()
      lines.append(line)
      if line.startswith("Waiting for a tf.data service worker") or not line:
        break
    assert lines[-1].startswith(f"Waiting for a tf.data service worker at "
                                f"grpc://localhost:{port}"), lines
    trainer.send_signal(signal.SIGTERM)
    _, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(
        "preempted: stopped by signal SIGTERM while waiting for a tf.data service worker")
  finally:
    dispatcher.terminate()
    dispatcher.communicate(timeout=30)
