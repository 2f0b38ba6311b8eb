"""Sources and pipelines: digits, image folders, tfds without download."""

import os

import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf import augment
from corinfomax_tf import data
from tests import helpers

VIEWS = (augment.ViewConfig(), augment.ViewConfig(blur_prob=0.1, solarize_prob=0.2))


def test_digits_source_is_stratified_and_disjoint():
  (x_tr, y_tr), (x_te, y_te) = data.digits_arrays(16)
  assert x_tr.shape == (1437, 16, 16, 3) and x_te.shape == (360, 16, 16, 3)
  assert x_tr.dtype == np.uint8
  assert np.bincount(y_te).min() >= 35
  train_rows = {r.tobytes() for r in x_tr}
  assert sum(r.tobytes() in train_rows for r in x_te) < 5  # digits has a few duplicates


def test_two_view_batches_from_an_image_folder(tmp_path):
  root = helpers.write_image_folder(str(tmp_path))
  source = data.load_source("folder", image_size=12, data_dir=root)
  assert (source.num_train, source.num_test, source.num_classes) == (18, 18, 3)
  ds = data.two_view_dataset(source, global_batch_size=4, image_size=12, views=VIEWS,
                             mean=(0.5,) * 3, std=(0.25,) * 3, seed=1)
  views, labels = next(iter(ds))
  assert views.shape == (4, 2, 12, 12, 3) and labels.dtype == tf.int64
  assert not np.allclose(views[:, 0].numpy(), views[:, 1].numpy())


def test_two_view_pipeline_is_reproducible_from_its_seed():
  source = data.digits_source(16)
  kwargs = dict(global_batch_size=8, image_size=16, views=VIEWS, mean=(0.3,) * 3,
                std=(0.35,) * 3, deterministic=True)
  a = [b[0][0].numpy() for b in data.two_view_dataset(source, seed=3, **kwargs).take(2)]
  b = [b[0][0].numpy() for b in data.two_view_dataset(source, seed=3, **kwargs).take(2)]
  c = [b[0][0].numpy() for b in data.two_view_dataset(source, seed=4, **kwargs).take(2)]
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.allclose(a[1], c[1])


def test_eval_dataset_keeps_every_image(tmp_path):
  root = helpers.write_image_folder(str(tmp_path), per_class=5)
  source = data.load_source("folder", image_size=8, data_dir=root)
  ds = data.eval_dataset(source.test, batch_size=4, image_size=8, mean=(0.5,) * 3,
                         std=(0.5,) * 3)
  shapes = [x.shape[0] for x, _ in ds]
  assert sum(shapes) == 15 and shapes[-1] == 3


def test_folder_errors_name_the_path(tmp_path):
  with pytest.raises(data.DataError, match="--data_dir: directory .*nope.* does not exist"):
    data.load_source("folder", image_size=8, data_dir=str(tmp_path / "nope"))
  os.makedirs(tmp_path / "d" / "train" / "empty_class")
  with pytest.raises(data.DataError, match="empty_class.* holds no usable images"):
    data.load_source("folder", image_size=8, data_dir=str(tmp_path / "d"))
  helpers.write_image_folder(str(tmp_path / "e"), splits=("train",))
  with pytest.raises(data.DataError, match="test.* does not exist"):
    data.load_source("folder", image_size=8, data_dir=str(tmp_path / "e"))


def test_tfds_not_prepared_fails_at_once_without_download(tmp_path):
  with pytest.raises(data.DataError, match="--dataset=cifar10: not prepared"):
    data.load_source("cifar10", image_size=32, tfds_data_dir=str(tmp_path),
                     tfds_download=False)
  with pytest.raises(data.DataError, match="--dataset=no_such_set_xyz"):
    data.load_source("no_such_set_xyz", image_size=32, tfds_data_dir=str(tmp_path))


def test_tfds_download_offline_fails_at_once_with_one_line(tmp_path, monkeypatch):
  # The network check is replaced: tests must never reach out.
  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: False)
  with pytest.raises(data.DataError, match="network is unreachable") as info:
    data.load_source("cifar10", image_size=32, tfds_data_dir=str(tmp_path),
                     tfds_download=True)
  assert "\n" not in str(info.value)
