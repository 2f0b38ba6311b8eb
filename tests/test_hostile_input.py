"""Hostile image folders: every bad file is skipped and counted, or named in an error."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from corinfomax_tf.data import augment
from corinfomax_tf.data import datasets as data
from corinfomax_tf.data import image_folder
from tests import helpers
from corinfomax_tf import errors

VIEWS = (augment.ViewConfig(), augment.ViewConfig())


def _rgb(seed, size=(20, 24)):
  return (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)


def _encoded(array, fmt, mode=None):
  buffer = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buffer, format=fmt)
  return buffer.getvalue()


def write_hostile_files(folder):
  """One file of each kind; returns {file name: expected verdict}."""
  good_jpeg = _encoded(_rgb(1), "JPEG")
  good_png = _encoded(_rgb(2), "PNG")
  files = {
      "cmyk.jpg": (_encoded(_rgb(3), "JPEG", "CMYK"), (None, "cmyk")),
      "gray16.png": (_encoded((np.random.RandomState(4).rand(20, 24) * 65535)
                              .astype(np.uint16), "PNG"), (None, "16-bit")),
      "gray.png": (_encoded(_rgb(5)[..., 0], "PNG"), (None, "grayscale")),
      "rgba.png": (_encoded(_rgb(6), "PNG", "RGBA"), (None, "alpha")),
      "palette.gif": (_encoded(_rgb(7), "GIF", "P"), (None, "palette")),
      "png_named.jpg": (good_png, (None, "")),
      "huge.png": (_encoded(np.zeros((300, 300, 3), np.uint8), "PNG"), ("too_large", None)),
      "garbage.jpg": (os.urandom(700), ("unreadable", None)),
      "zero.png": (b"", ("empty_file", None)),
      "cut_tail.jpg": (good_jpeg[:int(len(good_jpeg) * 0.7)], ("truncated", None)),
      "cut_tail.png": (good_png[:int(len(good_png) * 0.7)], ("truncated", None)),
      "tiff_named.png": (_encoded(_rgb(8), "TIFF"), ("unsupported_format", None)),
      "notes.txt": (b"not an image", ("not_an_image", None)),
      ".DS_Store": (b"\x00\x01", ("not_an_image", None)),
  }
  for name, (payload, _) in files.items():
    with open(os.path.join(folder, name), "wb") as fh:
      fh.write(payload)
  return {name: verdict for name, (_, verdict) in files.items()}


@pytest.fixture
def hostile_root(tmp_path):
  root = helpers.write_image_folder(str(tmp_path / "images"), classes=2, per_class=4)
  expected = write_hostile_files(os.path.join(root, "train", "class_1"))
  return root, expected


def test_each_bad_file_gets_its_verdict(hostile_root):
  root, expected = hostile_root
  for name, (reason, converted) in expected.items():
    got_reason, detail = image_folder.check_file(
        os.path.join(root, "train", "class_1", name), max_pixels=50_000)
    assert got_reason == reason, (name, got_reason, detail)
    if reason is None:
      assert detail == converted, name


def test_scan_keeps_skips_and_counts(hostile_root):
  root, expected = hostile_root
  scan = image_folder.scan_image_folder(os.path.join(root, "train"), max_pixels=50_000)
  kept = [n for n, (reason, _) in expected.items() if reason is None]
  assert len(scan.paths) == 8 + len(kept)
  assert scan.converted == {"cmyk": 1, "16-bit": 1, "grayscale": 1, "alpha": 1,
                            "palette": 1}
  report = scan.to_dict()
  assert {r: v["count"] for r, v in report["skipped"].items()} == {
      "too_large": 1, "unreadable": 1, "empty_file": 1, "truncated": 2,
      "unsupported_format": 1, "not_an_image": 2}
  assert scan.num_skipped + len(scan.paths) == 8 + len(expected)
  assert "8 skipped" in scan.summary() and "14 images in 2 classes kept" in scan.summary()


def test_hostile_folder_trains_and_evaluates(hostile_root):
  root, _ = hostile_root
  source = data.load_source("folder", image_size=12, data_dir=root,
                            max_image_pixels=50_000)
  ds = data.two_view_dataset(source, global_batch_size=4, image_size=12, views=VIEWS,
                             mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)
  for views, _ in ds.take(10):  # several passes over the 14 kept images
    assert np.isfinite(views.numpy()).all()
  images = list(data.eval_dataset(source.train, batch_size=5, image_size=12,
                                  mean=(0.5,) * 3, std=(0.25,) * 3))
  assert sum(x.shape[0] for x, _ in images) == source.num_train == 14


def test_bad_images_error_names_the_file(hostile_root):
  root, _ = hostile_root
  with pytest.raises(errors.DataError, match=r"bad image '.*class_1/\w+\.(png|jpg)': "):
    data.load_source("folder", image_size=12, data_dir=root, bad_images="error",
                     max_image_pixels=50_000)


def test_a_class_left_empty_by_skipping_is_rejected(tmp_path):
  root = helpers.write_image_folder(str(tmp_path / "images"), classes=2, per_class=3)
  folder = os.path.join(root, "train", "class_0")
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "wb") as fh:
      fh.write(b"broken")
  with pytest.raises(errors.DataError, match="class_0' holds no usable images"):
    data.load_source("folder", image_size=12, data_dir=root)


def test_undetected_corruption_is_dropped_by_the_pipeline(tmp_path):
  # With the check off, garbage reaches the decoder: the pipeline drops it and goes on.
  root = helpers.write_image_folder(str(tmp_path / "images"), classes=2, per_class=3)
  with open(os.path.join(root, "train", "class_0", "garbage.png"), "wb") as fh:
    fh.write(os.urandom(300))
  source = data.load_source("folder", image_size=12, data_dir=root, image_check="none")
  assert source.num_train == 7
  images = list(data.eval_dataset(source.train, batch_size=8, image_size=12,
                                  mean=(0.5,) * 3, std=(0.25,) * 3))
  assert sum(x.shape[0] for x, _ in images) == 6


def _mutations(rs, payload):
  """Random damage of the kinds seen on disks: truncation, flipped bytes, garbage."""
  kind = rs.randint(4)
  data_ = bytearray(payload)
  if kind == 0:
    return bytes(data_[:rs.randint(1, len(data_))])
  if kind == 1:
    for i in rs.randint(0, len(data_), size=rs.randint(1, 20)):
      data_[i] = rs.randint(256)
    return bytes(data_)
  if kind == 2:
    start = rs.randint(len(data_))
    return bytes(data_[:start]) + rs.bytes(rs.randint(1, 200)) + bytes(data_[start:])
  return rs.bytes(rs.randint(1, 2000))


@pytest.mark.parametrize("check", ["header", "full"])
def test_fuzzed_files_never_break_the_pipeline(tmp_path, check):
  root = helpers.write_image_folder(str(tmp_path / "images"), classes=2, per_class=3)
  rs = np.random.RandomState(0)
  sources = [_encoded(_rgb(9), "JPEG"), _encoded(_rgb(10), "PNG"),
             _encoded(_rgb(11), "GIF", "P"), _encoded(_rgb(12), "BMP")]
  extensions = [".jpg", ".png", ".gif", ".bmp"]
  for i in range(60):
    k = rs.randint(4)
    with open(os.path.join(root, "train", f"class_{i % 2}", f"fuzz_{i}{extensions[k]}"),
              "wb") as fh:
      fh.write(_mutations(rs, sources[k]))
  source = data.load_source("folder", image_size=12, data_dir=root, image_check=check)
  scan = source.scans[0]
  assert len(scan.paths) + scan.num_skipped == 66
  assert scan.num_skipped > 0
  images = list(data.eval_dataset(source.train, batch_size=16, image_size=12,
                                  mean=(0.5,) * 3, std=(0.25,) * 3))
  decoded = sum(x.shape[0] for x, _ in images)
  assert 6 <= decoded <= source.num_train
  if check == "full":  # every kept file is known to decode
    assert decoded == source.num_train
  ds = data.two_view_dataset(source, global_batch_size=8, image_size=12, views=VIEWS,
                             mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)
  for views, _ in ds.take(3):
    assert np.isfinite(views.numpy()).all()
  print(f"{check}: {scan.summary()}; decoded {decoded} of {source.num_train} kept")
