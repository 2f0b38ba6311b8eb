"""A user's own data: unlabeled image trees and lists, tfds downloads, embeddings."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from corinfomax_tf import errors
from corinfomax_tf.data import datasets as data
from corinfomax_tf.data import image_folder
from corinfomax_tf.evaluation import embedding
from tests import helpers


# ----------------------------------------------------------------------------
# Unlabeled trees and list files.
# ----------------------------------------------------------------------------


def test_a_nested_tree_keeps_every_image_and_counts_the_rest(tmp_path):
  root = helpers.write_image_tree(str(tmp_path / "photos"))
  os.makedirs(tmp_path / "photos" / ".thumbnails")
  Image.new("RGB", (9, 9)).save(tmp_path / "photos" / ".thumbnails" / "hidden.png")
  with open(tmp_path / "photos" / "trip_1" / "broken.jpg", "wb") as fh:
    fh.write(b"not a jpeg at all")
  scan = image_folder.scan_unlabeled_images(root)
  assert len(scan.paths) == 24 and set(scan.labels) == {-1} and scan.classes == []
  assert any("day_1" in p for p in scan.paths)        # nested folders are read
  assert not any(".thumbnails" in p for p in scan.paths)
  assert {k: len(v) for k, v in scan.skipped.items()} == {"not_an_image": 1,
                                                         "unreadable": 1}
  assert scan.summary().endswith("24 images kept (no labels); 2 skipped: "
                                 "1 not_an_image, 1 unreadable")
  # A fixed order: the same tree gives the same stream on every worker and rerun.
  assert image_folder.scan_unlabeled_images(root).paths == scan.paths


def test_a_list_file_reads_relative_paths_and_names_a_missing_line(tmp_path):
  root = helpers.write_image_tree(str(tmp_path / "photos"), count=4)
  listing = tmp_path / "photos" / "list.txt"
  listing.write_text("# my picks\ntrip_0/photo_0.png\n\n"
                     f"{root}/trip_1/day_1/photo_1.jpg\n")
  scan = image_folder.scan_unlabeled_images(str(listing))
  assert [os.path.basename(p) for p in scan.paths] == ["photo_0.png", "photo_1.jpg"]
  listing.write_text("trip_0/photo_0.png\ntrip_0/gone.png\ntrip_0/also_gone.png\n")
  with pytest.raises(errors.DataError, match=r"line 2 of .*list.txt.* names "
                     r"'trip_0/gone.png', which is not a file \(2 missing in all\)"):
    image_folder.scan_unlabeled_images(str(listing))


def test_empty_and_unreadable_trees_fail_naming_the_path(tmp_path):
  os.makedirs(tmp_path / "empty" / "nested")
  with pytest.raises(errors.DataError, match="--data_dir: .*empty' holds no files"):
    data.load_source("images", image_size=8, data_dir=str(tmp_path / "empty"))
  os.makedirs(tmp_path / "junk")
  (tmp_path / "junk" / "a.txt").write_text("x")
  (tmp_path / "junk" / "b.png").write_bytes(b"garbage")
  with pytest.raises(errors.DataError, match="no usable image in .*junk.*1 "
                     "not_an_image, 1 unreadable") as info:
    data.load_source("images", image_size=8, data_dir=str(tmp_path / "junk"))
  assert "\n" not in str(info.value)


def test_an_unlabeled_source_streams_resumes_and_has_no_test_split(tmp_path):
  source = data.load_source("images", image_size=12,
                            data_dir=helpers.write_image_tree(str(tmp_path)))
  assert (source.num_train, source.num_test, source.labelled, source.test) == (
      24, 0, False, None)
  kwargs = dict(global_batch_size=4, image_size=12, views=(data.augment.ViewConfig(),) * 2,
                mean=(0.5,) * 3, std=(0.25,) * 3, seed=3, deterministic=True)
  whole = list(data.two_view_dataset(source, **kwargs).take(5))
  resumed = list(data.two_view_dataset(source, skip_batches=3, **kwargs).take(2))
  for (a, la), (b, lb) in zip(whole[3:], resumed):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert set(la.numpy()) == {-1} and set(lb.numpy()) == {-1}


def test_an_eval_set_of_another_image_size_is_refused(monkeypatch):
  from corinfomax_tf import config
  from corinfomax_tf.training import pretraining
  cfg = config.Config(
      data=config.DataConfig(dataset="images", data_dir="x", image_size=64,
                             eval_dataset="cifar10"),
      augment=config.AugmentConfig(), model=config.ModelConfig(),
      loss=config.LossConfig(), optim=config.OptimConfig(), train=config.TrainConfig())
  small = data.digits_source(32)
  monkeypatch.setattr(data, "load_source", lambda *a, **k: small)
  with pytest.raises(errors.ConfigError, match=r"--eval_dataset=cifar10: its images are "
                     r"32x32 and the encoder's 64x64 \(--image_size\)"):
    pretraining.load_eval_source(cfg, None, print)
  lines = []
  cfg = config.Config(**{**cfg.__dict__, "data": config.DataConfig(
      dataset="images", data_dir="x", image_size=64)})
  assert pretraining.load_eval_source(cfg, None, lines.append)[0] is None
  assert lines == ["Linear probe and kNN monitor skipped: --dataset=images has no labels "
                   "and no --eval_dataset names a labelled set"]


# ----------------------------------------------------------------------------
# Downloads.
# ----------------------------------------------------------------------------


def test_a_failed_download_is_one_line(monkeypatch):
  class Builder:
    def download_and_prepare(self):
      raise ConnectionResetError("Connection reset by peer\n  details...")
  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: True)
  with pytest.raises(errors.DataError, match=r"--dataset=cifar10: the download failed "
                     r"\(ConnectionResetError: Connection reset by peer\); rerun") as info:
    data._download(Builder(), "cifar10", "/data/tfds", True)
  assert "\n" not in str(info.value)


def test_a_manual_download_set_asks_for_its_archives_not_the_network(tmp_path, monkeypatch):
  class Manual:
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download ILSVRC2012_img_train.tar ..."
    _data_dir_root = str(tmp_path)
  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: pytest.fail("probed"))
  with pytest.raises(errors.DataError, match=r"--dataset=imagenet2012: not prepared in .*"
                     r"download by hand: put them in .*downloads/manual"):
    data._download(Manual(), "imagenet2012", str(tmp_path), True)


def _closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_the_cards_command_offline_answers_at_once_with_one_line(tmp_path):
  # "Offline" is a probe at a closed local port: the test never reaches out.
  env = dict(helpers.ENV, CORINFOMAX_NETWORK_PROBE=f"127.0.0.1:{_closed_port()}")
  common = ["--flagfile=configs/cifar100.cfg", f"--tfds_data_dir={tmp_path / 'tfds'}"]
  started = time.time()
  procs = [helpers.popen([sys.executable, "-m", "corinfomax_tf.train", *common,
                             f"--workdir={tmp_path / str(i)}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=helpers.ROOT)
           for i, extra in enumerate(([], ["--notfds_download"]))]
  (_, offline), (_, forbidden) = [p.communicate(timeout=300) for p in procs]
  # tfds' own retries would take minutes; the probe answers in seconds (generous
  # bound for a loaded CI machine: this is not a speed test).
  assert time.time() - started < 150
  assert [p.returncode for p in procs] == [2, 2]
  for err, needle in ((offline, "the network does not answer (127.0.0.1:"),
                      (forbidden, "--notfds_download forbids a download")):
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --dataset=cifar100: not prepared in ") and needle in last
    assert "tfds build cifar100 --data_dir DIR" in last and "Traceback" not in err
  assert not os.path.exists(tmp_path / "tfds" / "downloads")


# ----------------------------------------------------------------------------
# Pretraining on a tree; bad input.
# ----------------------------------------------------------------------------


def _event_tags(folder):
  tags = set()
  for name in os.listdir(folder):
    if "tfevents" in name:
      for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
        tags.update(v.tag for v in event.summary.value)
  return tags


@pytest.mark.slow
def test_pretraining_on_an_unlabeled_tree_with_monitors_and_an_eval_set(tmp_path):
  root = helpers.write_image_tree(str(tmp_path / "photos"))
  workdir = str(tmp_path / "run")
  result = helpers.run_command(
      "corinfomax_tf.train", f"--flagfile={helpers.SMOKE}", f"--workdir={workdir}",
      "--dataset=images", f"--data_dir={root}", "--monitor_every_steps=1",
      "--eval_dataset=digits", "--knn_every_epochs=1", "--knn_k=5", "--preview_images=4")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as fh:
    summary = json.load(fh)
  assert summary["dataset"] == "images" and summary["probe_dataset"] == "digits"
  assert summary["step"] == 6 and 0 <= summary["probe"]["top1"] <= 100
  assert summary["monitor"]["R1/effective_rank"] > 1 and "k5_top1" in summary["knn"]
  tags = _event_tags(os.path.join(workdir, "train"))
  assert {"spectrum/R1_effective_rank", "spectrum/ldmi", "loss/total",
          "augmentations/original_view1_view2"} <= tags, sorted(tags)
  with open(os.path.join(workdir, "data_report.json")) as fh:
    report = json.load(fh)
  assert report[root]["kept"] == 24 and report[root]["skipped"]["not_an_image"]["count"] == 1


@pytest.mark.slow
def test_own_data_bad_input_is_one_line_each(tmp_path):
  root = helpers.write_image_tree(str(tmp_path / "photos"), count=4)
  os.makedirs(tmp_path / "empty")
  listing = tmp_path / "list.txt"
  listing.write_text("photos/trip_0/photo_0.png\nphotos/nope.jpg\n")
  images = ["--dataset=images", f"--data_dir={root}"]
  cases = [
          (["--dataset=images", f"--data_dir={tmp_path}/empty"], "holds no files"),
          (["--dataset=images", f"--data_dir={listing}"],
           "line 2 of " + repr(str(listing)) + " names 'photos/nope.jpg'"),
          ([*images, "--test_split=val"], "--test_split=val: --dataset=images has no splits"),
          ([*images, "--online_probe"], "--online_probe=True: trains on the training "
           "images' labels"),
          ([*images, "--eval_dataset=folder", f"--eval_data_dir={tmp_path}/empty"],
           "--eval_data_dir/--eval_train_split: directory")]
  # A workdir each: they run at once, and a workdir has one holder at a time.
  helpers.assert_one_line_errors(
      "corinfomax_tf.train", [f"--flagfile={helpers.SMOKE}"],
      [([*args, f"--workdir={tmp_path}/w{i}"], needle)
       for i, (args, needle) in enumerate(cases)], helpers.ENV, helpers.ROOT)
  result = helpers.run_command("corinfomax_tf.train", f"--flagfile={helpers.SMOKE}",
                               f"--workdir={tmp_path}/p", *images, "--preview_only")
  assert result.returncode == 0, result.stderr[-2000:]
  assert ("Linear probe and kNN monitor skipped: --dataset=images has no labels and no "
          "--eval_dataset names a labelled set") in result.stdout


# ----------------------------------------------------------------------------
# Embeddings: the maths, then the command through a real TensorBoard server.
# ----------------------------------------------------------------------------


def test_nearest_is_cosine_ranked_with_stable_ties():
  features = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [2.0, 0.0]], np.float32)
  index, sim = embedding.nearest(features, np.array([[5.0, 0.0], [1.0, 1.2]]), k=3)
  np.testing.assert_array_equal(index, [[0, 3, 2], [2, 1, 0]])
  np.testing.assert_allclose(sim[0], [1.0, 1.0, np.sqrt(0.5)], rtol=1e-6)
  np.testing.assert_allclose(sim[1, 0], 2.2 / np.sqrt(2.44) / np.sqrt(2), rtol=1e-6)
  assert embedding.nearest(features, features[:1], k=10)[0].shape == (1, 4)


def test_sprite_is_a_row_major_square_grid():
  thumbs = np.stack([np.full((2, 2, 3), 10 * (i + 1), np.uint8) for i in range(5)])
  grid = embedding.sprite(thumbs)
  assert grid.shape == (6, 6, 3)   # ceil(sqrt(5)) = 3 thumbnails a side
  np.testing.assert_array_equal(grid[::2, ::2, 0], [[10, 20, 30], [40, 50, 0], [0, 0, 0]])
  assert embedding.thumbnail_size(360, 16) == 16
  assert embedding.thumbnail_size(50_000, 224) == 8192 // 224
  assert embedding.thumbnail_size(10_000_000, 224) == 0


def test_metadata_has_a_header_and_one_clean_row_per_image():
  lines = embedding.metadata_lines(2, np.array([1, 0]), ("cat", "dog"),
                                   ["a/x.png", "b\ty.png"])
  assert lines == ["index\tlabel\tclass\tpath", "0\t1\tdog\ta/x.png", "1\t0\tcat\tb y.png"]
  assert embedding.metadata_lines(1) == ["index", "0"]


def _get(port, path, raw=False):
  with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
    body = r.read()
  return body if raw else json.loads(body.decode())


@pytest.mark.slow
def test_embed_writes_the_digits_test_split_and_tensorboard_serves_it(trained, tmp_path):
  _, export_dir = trained
  out = str(tmp_path / "embed")
  (_, _), (x_test, y_test) = data.digits_arrays(8)
  Image.fromarray(x_test[7]).save(tmp_path / "query.png")
  result = helpers.run_command("corinfomax_tf.embed", f"--encoder={export_dir}",
                               "--dataset=digits", "--split=test", f"--workdir={out}",
                               f"--query={tmp_path / 'query.png'}", "--k=3")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(os.path.join(out, "embeddings.npz")) as saved:
    features, labels = saved["features"], saved["labels"]
  assert features.shape[0] == 360 and np.isfinite(features).all()
  np.testing.assert_array_equal(labels, y_test)
  # The query is test image 7 itself (PNG is lossless): its own row comes first.
  with open(os.path.join(out, "neighbours.json")) as fh:
    first = json.load(fh)[0]["neighbours"][0]
  assert first["index"] == 7 and first["similarity"] == pytest.approx(1.0, abs=1e-5)
  assert first["class"] == str(y_test[7])
  # A rerun reuses the arrays instead of embedding again.
  again = helpers.run_command("corinfomax_tf.embed", f"--encoder={export_dir}",
                              "--dataset=digits", f"--workdir={out}")
  assert again.returncode == 0 and "Reusing the 360 embeddings" in again.stdout

  port = helpers.free_port()
  server = helpers.popen(
      [sys.executable, "-m", "tensorboard.main", f"--logdir={out}", f"--port={port}",
       "--host=127.0.0.1", "--load_fast=false"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=helpers.ENV)
  try:
    deadline, runs = time.time() + 120, None
    while time.time() < deadline and not runs:
      try:
        runs = _get(port, "/data/plugin/projector/runs")
      except OSError:
        time.sleep(1)
    assert runs == ["."], runs
    info = _get(port, "/data/plugin/projector/info?run=.")
    entry = info["embeddings"][0]
    assert entry["tensorShape"] == [360, features.shape[1]]
    name = urllib.parse.quote(entry["tensorName"])
    tensor = np.frombuffer(_get(port, f"/data/plugin/projector/tensor?run=.&name={name}",
                                raw=True), np.float32).reshape(360, -1)
    np.testing.assert_array_equal(tensor, features)
    rows = _get(port, f"/data/plugin/projector/metadata?run=.&name={name}",
                raw=True).decode().splitlines()
    assert rows[0] == "index\tlabel\tclass" and len(rows) == 361
    assert rows[8] == f"7\t{y_test[7]}\t{y_test[7]}"
    sprite = _get(port, f"/data/plugin/projector/sprite_image?run=.&name={name}", raw=True)
    assert sprite[:8] == b"\x89PNG\r\n\x1a\n"
  finally:
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_embed_an_unlabeled_tree_with_paths_and_its_bad_input(trained, tmp_path):
  _, export_dir = trained
  root = helpers.write_image_tree(str(tmp_path / "photos"), count=6)
  out = str(tmp_path / "embed")
  result = helpers.run_command("corinfomax_tf.embed", f"--encoder={export_dir}",
                               "--dataset=images", f"--data_dir={root}",
                               f"--workdir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(os.path.join(out, "embeddings.npz")) as saved:
    paths, labels = list(saved["paths"]), saved["labels"]
  assert len(paths) == 6 and all(p.startswith(root) for p in paths) and set(labels) == {-1}
  with open(os.path.join(out, "metadata.tsv")) as fh:
    assert fh.readline().strip() == "index\tpath"
  helpers.assert_one_line_errors("corinfomax_tf.embed", [f"--encoder={export_dir}"], [
      (["--dataset=images", f"--data_dir={root}", "--split=train"],
       "--split=train: --dataset=images has no splits"),
      (["--dataset=digits", "--split=validation"], "--split=validation: digits has splits"),
      (["--dataset=digits", f"--workdir={out}2", f"--query={root}/nope.png"],
       "--query: '" + root + "/nope.png' is not a usable image")],
      helpers.ENV, helpers.ROOT)
