"""Sources and pipelines: digits, image folders, tfds without download."""

import os

import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf.data import augment
from corinfomax_tf.data import datasets as data
from tests import helpers
from corinfomax_tf import errors

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


@pytest.mark.slow
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
  with pytest.raises(errors.DataError, match="--data_dir: directory .*nope.* does not exist"):
    data.load_source("folder", image_size=8, data_dir=str(tmp_path / "nope"))
  os.makedirs(tmp_path / "d" / "train" / "empty_class")
  with pytest.raises(errors.DataError, match="empty_class.* holds no usable images"):
    data.load_source("folder", image_size=8, data_dir=str(tmp_path / "d"))
  helpers.write_image_folder(str(tmp_path / "e"), splits=("train",))
  with pytest.raises(errors.DataError, match="test.* does not exist"):
    data.load_source("folder", image_size=8, data_dir=str(tmp_path / "e"))


def test_tfds_not_prepared_fails_at_once_without_download(tmp_path):
  with pytest.raises(errors.DataError, match="--dataset=cifar10: not prepared"):
    data.load_source("cifar10", image_size=32, tfds_data_dir=str(tmp_path),
                     tfds_download=False)
  with pytest.raises(errors.DataError, match="--dataset=no_such_set_xyz"):
    data.load_source("no_such_set_xyz", image_size=32, tfds_data_dir=str(tmp_path))


def test_tfds_download_offline_fails_at_once_with_one_line(tmp_path, monkeypatch):
  # The network check is replaced: tests must never reach out.
  monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: False)
  with pytest.raises(errors.DataError, match="network does not answer") as info:
    data.load_source("cifar10", image_size=32, tfds_data_dir=str(tmp_path),
                     tfds_download=True)
  assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------
# Worker-local input: each input pipeline its own part of every global batch.
# ----------------------------------------------------------------------------

PIPELINE = dict(image_size=12, views=VIEWS, mean=(0.5,) * 3, std=(0.25,) * 3, seed=5,
                deterministic=True)


def _global_and_sharded(source, global_batch, pipelines, replicas_per_pipeline, steps,
                        skip_batches=0):
  """The global batches, and what the pipelines' replicas get, re-assembled in
  replica order (worker 0's replicas first), step by step."""
  whole = [b for b in data.two_view_dataset(
      source, global_batch_size=global_batch, skip_batches=skip_batches,
      **PIPELINE).take(steps)]
  per_pipeline = []
  for index in range(pipelines):
    context = tf.distribute.InputContext(pipelines, index,
                                         pipelines * replicas_per_pipeline)
    ds = data.two_view_dataset(source, global_batch_size=global_batch,
                               skip_batches=skip_batches, input_context=context, **PIPELINE)
    per_pipeline.append(list(ds.take(steps * replicas_per_pipeline)))
  assembled = []
  for step in range(steps):
    # The replicas of one pipeline take its per-replica batches in turn.
    parts = [batches[step * replicas_per_pipeline + r] for batches in per_pipeline
             for r in range(replicas_per_pipeline)]
    assembled.append(tuple(tf.concat([p[i] for p in parts], 0) for i in range(2)))
  return whole, assembled


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["digits", "folder", "images"])
def test_sharded_pipelines_together_give_exactly_the_global_batches(tmp_path, kind):
  if kind == "digits":
    source = data.digits_source(12)
  elif kind == "images":  # a user's unlabeled tree: sharded as paths, like a folder
    source = data.load_source("images", image_size=12,
                              data_dir=helpers.write_image_tree(str(tmp_path)))
    assert source.streams_encoded
  else:
    source = data.load_source("folder", image_size=12,
                              data_dir=helpers.write_image_folder(str(tmp_path)))
  for pipelines, replicas in ((2, 1), (2, 2), (4, 1)):
    whole, assembled = _global_and_sharded(source, 8, pipelines, replicas, steps=5,
                                           skip_batches=1)
    for (views, labels), (views_s, labels_s) in zip(whole, assembled):
      assert views_s.shape == views.shape
      np.testing.assert_array_equal(views_s.numpy(), views.numpy())
      np.testing.assert_array_equal(labels_s.numpy(), labels.numpy())


def test_image_folder_shards_paths_before_decoding(tmp_path):
  source = data.load_source("folder", image_size=12,
                            data_dir=helpers.write_image_folder(str(tmp_path)))
  streams = [data.element_stream(source, global_batch_size=6, seed=2,
                                 input_context=tf.distribute.InputContext(2, i, 2))
             for i in range(2)]
  # What is sharded is still a file path: each worker reads and decodes only its own.
  assert all(encoded and ds.element_spec[0].dtype == tf.string for ds, encoded in streams)
  whole, _ = data.element_stream(source, global_batch_size=6, seed=2)
  whole = [p.numpy() for p, _, _ in whole.take(18)]
  shards = [[p.numpy() for p, _, _ in ds.take(9)] for ds, _ in streams]
  for step in range(3):
    mine = [shards[i][3 * step:3 * step + 3] for i in range(2)]
    assert not set(mine[0]) & set(mine[1])
    assert mine[0] + mine[1] == whole[6 * step:6 * step + 6]


def test_distributed_replicas_get_their_slice_of_the_global_batch():
  from tests.conftest import CPU_DEVICES, mirrored
  source = data.digits_source(12)
  strategy = mirrored(CPU_DEVICES)
  dist = strategy.distribute_datasets_from_function(
      lambda context: data.two_view_dataset(source, global_batch_size=8,
                                            input_context=context, **PIPELINE))
  whole = data.two_view_dataset(source, global_batch_size=8, **PIPELINE)
  for (views, labels), (dviews, dlabels) in zip(whole.take(3), dist):
    local = strategy.experimental_local_results(dviews)
    assert len(local) == 2 and local[0].shape[0] == 4
    np.testing.assert_array_equal(tf.concat(local, 0).numpy(), views.numpy())
    np.testing.assert_array_equal(
        tf.concat(strategy.experimental_local_results(dlabels), 0).numpy(), labels.numpy())


@pytest.mark.slow
def test_large_tfds_sets_are_sharded_encoded_and_give_the_cached_stream(tmp_path,
                                                                         monkeypatch):
  from tests import generated_tfds
  generated_tfds.prepare(str(tmp_path))
  load = lambda: data.load_source(generated_tfds.NAME, image_size=12,  # noqa: E731
                                  tfds_data_dir=str(tmp_path))
  small = load()
  assert small.in_memory and small.train_encoded is None
  monkeypatch.setattr(data, "IN_MEMORY_BYTES", 0)
  large = load()
  assert not large.in_memory and (large.num_train, large.num_classes) == (30, 3)
  # Shuffled and sharded as encoded bytes; decoded only by the worker that keeps them.
  stream, encoded = data.element_stream(
      large, global_batch_size=6, seed=1, input_context=tf.distribute.InputContext(2, 1, 2))
  assert encoded and stream.element_spec[0].dtype == tf.string
  # PNG is lossless: decoding after the shuffle gives the stream of the cached set.
  for (a, la), (b, lb) in zip(data.two_view_dataset(small, global_batch_size=6, **PIPELINE)
                              .take(6),
                              data.two_view_dataset(large, global_batch_size=6, **PIPELINE)
                              .take(6)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(la.numpy(), lb.numpy())
  whole, assembled = _global_and_sharded(large, 6, 2, 1, steps=3)
  for (a, _), (b, _) in zip(whole, assembled):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
