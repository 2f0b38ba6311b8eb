"""Data sources and the two-view tf.data pipelines.

Sources yield (image, label) with uint8 images (H, W, 3):
  * "digits": scikit-learn's bundled handwritten digits, the embedded default (no
    download), upsampled once from 8x8 to the training size;
  * any tensorflow-datasets image classification set ("cifar10", "cifar100", ...),
    read from `tfds_data_dir` (downloaded when not prepared there, unless forbidden,
    and only after a quick check that the network answers);
  * "folder": a directory with one sub-folder per split, each holding one sub-folder
    of images per class (ImageNet-100, Tiny ImageNet, a user's own labelled data);
  * "images": a user's own unlabeled images: any tree of image files (nested folders,
    no classes, no splits) or a text file listing them. Its labels are -1, it has no
    test split and no classes: evaluation needs another, labelled, source.

Errors a user can cause raise errors.DataError, whose message names the flag or path.
"""

import dataclasses
import os
import re
import signal
import socket
import threading
import time
import uuid

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from corinfomax_tf import config as config_lib
from corinfomax_tf import errors
from corinfomax_tf.data import augment, image_folder

DIGITS_NUM_CLASSES = 10
# A tfds set whose decoded train split fits in this many bytes is cached decoded.
IN_MEMORY_BYTES = 2**30


# Where a download is known to be possible: checked (a TCP connection, a few seconds
# at most) before tensorflow-datasets starts a download that, offline, would fail only
# after minutes of retries. host:port; a mirror or proxy user may name their own.
NETWORK_PROBE_ENV = "CORINFOMAX_NETWORK_PROBE"
NETWORK_PROBE = "storage.googleapis.com:443"


@dataclasses.dataclass(frozen=True)
class Source:
  """An image data set, split into train and test (unlabeled sets: train only)."""
  name: str
  train: tf.data.Dataset          # (uint8 image (H, W, 3), int64 label; -1: none)
  test: tf.data.Dataset           # None for an unlabeled set
  num_train: int
  num_test: int
  num_classes: int
  in_memory: bool                 # small enough to cache decoded
  # Large sets: the train split still encoded, as (file path or encoded bytes, label),
  # so that the pretraining pipeline shuffles, skips (on resume) and shards (across
  # workers) cheap strings, and each worker decodes only its own images.
  train_encoded: tf.data.Dataset = None
  encoded_are_paths: bool = True  # strings are file paths (folders) or image bytes (tfds)
  # Image folders: what the check of each split kept, converted and skipped.
  scans: tuple = ()
  class_names: tuple = ()         # label -> name, where the set has names
  image_shape: tuple = None       # (height, width) where every image has it

  @property
  def labelled(self):
    return self.num_classes > 0

  @property
  def streams_encoded(self):
    """Whether pretraining shuffles and shards this set encoded and decodes per step."""
    return not self.in_memory and self.train_encoded is not None

  def scan_report(self):
    return {s.root: s.to_dict() for s in self.scans}


# ----------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------


def digits_arrays(image_size):
  """The digits set as uint8 arrays, stratified 80/20 split with a fixed seed."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  images = tf.image.resize(images, (image_size, image_size), method="bicubic")
  images = np.clip(np.round(images.numpy() * 255.0), 0, 255).astype(np.uint8)
  images = np.repeat(images, 3, axis=-1)
  labels = digits.target.astype(np.int64)
  x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.2,
                                            random_state=0, stratify=labels)
  return (x_tr, y_tr), (x_te, y_te)


def digits_source(image_size):
  (x_tr, y_tr), (x_te, y_te) = digits_arrays(image_size)
  return Source("digits", tf.data.Dataset.from_tensor_slices((x_tr, y_tr)),
                tf.data.Dataset.from_tensor_slices((x_te, y_te)), len(x_tr),
                len(x_te), DIGITS_NUM_CLASSES, in_memory=True,
                image_shape=(image_size, image_size),
                class_names=tuple(str(d) for d in range(DIGITS_NUM_CLASSES)))


def as_written(fn):
  """`fn` for `Dataset.map`, traced as written, without AutoGraph's rewrite of its
  source: the data functions branch and loop only on Python values (never on a
  tensor, which would fail at trace time without AutoGraph, not change the graph),
  so the graph is the same and the rewrite only costs time: about 1 s of every
  training command's start on a 2-core CPU."""
  return tf.autograph.experimental.do_not_convert(fn)


def _network_probe():
  value = os.environ.get(NETWORK_PROBE_ENV) or NETWORK_PROBE
  host, _, port = value.rpartition(":")
  try:
    return host, int(port)
  except ValueError:
    raise errors.DataError(f"{NETWORK_PROBE_ENV}={value}: expected host:port") from None


def tcp_reachable(host, port, timeout=5.0):
  """Whether a TCP connection to host:port opens within `timeout` seconds."""
  try:
    with socket.create_connection((host, int(port)), timeout=timeout):
      return True
  except (OSError, ValueError):
    return False


def _network_reachable(timeout=5.0):
  return tcp_reachable(*_network_probe(), timeout=timeout)


def _prepare_by_hand(name, where):
  return (f"prepare it by hand: `tfds build {name} --data_dir DIR` on a machine with "
          f"network, then copy DIR/{name} into {where}")


def _download(builder, name, data_dir, download):
  """Downloads and prepares a tfds set that is not prepared, or says why not."""
  where = data_dir or "~/tensorflow_datasets (the default --tfds_data_dir)"
  if not download:
    raise errors.DataError(f"--dataset={name}: not prepared in {where} and "
                           f"--notfds_download forbids a download; "
                           + _prepare_by_hand(name, where))
  # Sets prepared from archives the user downloads by hand (ImageNet) need no network,
  # but need the archives.
  manual = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
  if manual:
    root = getattr(builder, "_data_dir_root", None) or data_dir or "~/tensorflow_datasets"
    manual_dir = os.path.join(os.path.expanduser(root), "downloads", "manual")
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
      raise errors.DataError(f"--dataset={name}: not prepared in {where}, and it is "
                             f"prepared from archives you download by hand: put them in "
                             f"{manual_dir} (tensorflow-datasets' page for {name} lists "
                             "them), then rerun")
  elif not _network_reachable():
    host, port = _network_probe()
    raise errors.DataError(f"--dataset={name}: not prepared in {where} and the network "
                           f"does not answer ({host}:{port}) for a download; "
                           + _prepare_by_hand(name, where))
  print(f"Downloading and preparing {name} into {where} (once; --notfds_download "
        "forbids it)", flush=True)
  try:
    builder.download_and_prepare()
  except Exception as e:  # tfds and its downloaders raise many types
    message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise errors.DataError(f"--dataset={name}: the download failed ({type(e).__name__}: "
                           f"{message}); rerun to resume it, or "
                           + _prepare_by_hand(name, where)) from None


def tfds_source(name, data_dir, train_split, test_split, download):
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    raise errors.DataError(f"--dataset={name}: not a tensorflow-datasets data set "
                    f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    _download(builder, name, data_dir, download)
  splits = builder.info.splits
  for flag, split in (("--train_split", train_split), ("--test_split", test_split)):
    if split not in splits:
      raise errors.DataError(f"{flag}={split}: {name} has splits {sorted(splits.keys())}")
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise errors.DataError(f"--dataset={name}: needs 'image' and 'label' features; "
                    f"has {sorted(features.keys())}")

  def load(split):
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    return ds.map(lambda x, y: (_ensure_rgb(x), tf.cast(y, tf.int64)),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def load_encoded(split):
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    return ds.map(lambda x, y: (x, tf.cast(y, tf.int64)))

  num_classes = features["label"].num_classes
  names = tuple(getattr(features["label"], "names", None) or ())
  shape = tuple(features["image"].shape[:2])
  small = splits[train_split].num_examples * np.prod(
      features["image"].shape[:2] if None not in features["image"].shape[:2]
      else (256, 256)) * 3 < IN_MEMORY_BYTES
  return Source(name, load(train_split), load(test_split),
                splits[train_split].num_examples, splits[test_split].num_examples,
                num_classes, in_memory=bool(small),
                train_encoded=None if small else load_encoded(train_split),
                encoded_are_paths=False, class_names=names,
                image_shape=None if None in shape else shape)


def _ensure_rgb(image):
  if image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


def _decode(encoded, label, is_path=True):
  data = tf.io.read_file(encoded) if is_path else encoded
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return tf.ensure_shape(image, (None, None, 3)), label


def decode_skipping_errors(paths_ds, deterministic=None, are_paths=True):
  """(path, label, ...) -> (image, label, ...); a file that fails to decode is dropped.

  With are_paths=False the strings are the encoded images themselves (tfds).

  The folder scan has already set aside the files it could recognise as bad; this is
  the last line of defence for what slips through (or changes after the scan), and
  tf.data logs each drop. Only the decode is guarded, so an error anywhere else still
  surfaces.
  """
  def decode(path, label, *rest):
    return (*_decode(path, label, are_paths), *rest)
  return paths_ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=deterministic).ignore_errors(log_warning=True)


def folder_source(data_dir, train_split, test_split, in_memory=False,
                  image_check="header", max_image_pixels=image_folder.DEFAULT_MAX_PIXELS,
                  bad_images="skip"):
  if not os.path.isdir(data_dir):
    raise errors.DataError(f"--data_dir: directory {data_dir!r} does not exist")
  scans = {}
  for flag, split in (("--data_dir/--train_split", train_split),
                      ("--data_dir/--test_split", test_split)):
    if split in scans:
      continue
    scans[split] = image_folder.scan_image_folder(
        os.path.join(data_dir, split), flag, check=image_check,
        max_pixels=max_image_pixels, on_bad=bad_images)
  train, test = scans[train_split], scans[test_split]
  if test.classes != train.classes:
    missing = sorted(set(train.classes) ^ set(test.classes))[:5]
    raise errors.DataError(f"--data_dir: {train.root!r} and {test.root!r} have different "
                    f"class folders (e.g. {missing})")

  def paths_of(scan):
    return tf.data.Dataset.from_tensor_slices(
        (tf.constant(scan.paths), tf.constant(scan.labels, tf.int64)))

  return Source(os.path.basename(os.path.normpath(data_dir)) or "folder",
                decode_skipping_errors(paths_of(train)),
                decode_skipping_errors(paths_of(test)), len(train.paths), len(test.paths),
                len(train.classes), in_memory=in_memory, train_encoded=paths_of(train),
                scans=(train, test), class_names=tuple(train.classes))


def images_source(data_dir, in_memory=False, image_check="header",
                  max_image_pixels=image_folder.DEFAULT_MAX_PIXELS, bad_images="skip"):
  """A user's unlabeled images (a tree or a list file): train only, labels -1."""
  scan = image_folder.scan_unlabeled_images(data_dir, "--data_dir", check=image_check,
                                            max_pixels=max_image_pixels, on_bad=bad_images)
  paths = tf.data.Dataset.from_tensor_slices(
      (tf.constant(scan.paths), tf.constant(scan.labels, tf.int64)))
  name = os.path.basename(os.path.normpath(data_dir)) or "images"
  return Source(name, decode_skipping_errors(paths), None, len(scan.paths), 0, 0,
                in_memory=in_memory, train_encoded=paths, scans=(scan,))


def load_source(dataset, *, image_size, data_dir=None, tfds_data_dir=None,
                train_split="train", test_split="test", tfds_download=True,
                cache=False, image_check="header",
                max_image_pixels=image_folder.DEFAULT_MAX_PIXELS, bad_images="skip"):
  """Builds the Source a config names; fails fast with an errors.DataError."""
  if dataset == "digits":
    return digits_source(image_size)
  if dataset in ("folder", "images") and not data_dir:
    raise errors.DataError(f"--data_dir is required with --dataset={dataset}")
  if dataset == "images":
    return images_source(data_dir, in_memory=cache, image_check=image_check,
                         max_image_pixels=max_image_pixels, bad_images=bad_images)
  if dataset == "folder":
    return folder_source(data_dir, train_split, test_split, in_memory=cache,
                         image_check=image_check, max_image_pixels=max_image_pixels,
                         bad_images=bad_images)
  return tfds_source(dataset, tfds_data_dir, train_split, test_split, tfds_download)


def holdout_indices(num_images, fraction, seed):
  """Sorted indices of a seeded random `fraction` of `num_images` images: the
  held-out validation split (at least one image held out and one kept)."""
  count = int(round(num_images * fraction))
  if not 0 < count < num_images:
    raise errors.ConfigError(
        f"--validation_fraction={fraction}: holds out {count} of the {num_images} "
        "training images; at least one must be held out and one kept")
  return np.sort(np.random.default_rng(seed).permutation(num_images)[:count])


def _pick(ds, mask, keep):
  """The elements of `ds` whose position is (keep=True) or is not held out in `mask`."""
  table = tf.constant(mask)
  return ds.enumerate().filter(
      lambda i, *element: tf.equal(tf.gather(table, i), keep)).map(
          lambda i, *element: element[0] if len(element) == 1 else element)


def holdout(source, fraction, seed):
  """`source` with a seeded random `fraction` of its train split held out.

  Returns (Source whose train split is the rest and whose test split is the held-out
  images, the held-out indices into the original train split). Positions are taken
  before decoding, so a file that fails to decode cannot shift them.
  """
  held = holdout_indices(source.num_train, fraction, seed)
  mask = np.zeros(source.num_train, bool)
  mask[held] = True
  encoded = source.train_encoded
  if encoded is not None and source.encoded_are_paths:
    rest = decode_skipping_errors(_pick(encoded, mask, False))
    validation = decode_skipping_errors(_pick(encoded, mask, True))
  else:
    rest, validation = _pick(source.train, mask, False), _pick(source.train, mask, True)
  return dataclasses.replace(
      source, name=f"{source.name}[train minus validation]", train=rest,
      test=validation, num_train=source.num_train - len(held), num_test=len(held),
      train_encoded=None if encoded is None else _pick(encoded, mask, False)), held


# ----------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------


def shard_of_batches(ds, global_batch_size, num_shards, index):
  """Input pipeline `index`'s part of every global batch of a stream of elements.

  Pipeline i keeps elements [i*b, (i+1)*b) of each run of B = global_batch_size
  elements, b = B / num_shards: the same elements, in the same order, that
  splitting the global batch across pipelines would give it, so sharded pipelines
  together yield exactly the single-pipeline global batches.
  """
  if num_shards == 1:
    return ds
  if global_batch_size % num_shards:
    raise ValueError(f"global batch {global_batch_size} is not divisible by "
                     f"{num_shards} input pipelines")
  per_shard = global_batch_size // num_shards
  return ds.batch(per_shard, drop_remainder=True).shard(num_shards, index).unbatch()


def element_stream(source, *, global_batch_size, seed, shuffle_buffer=10000,
                   skip_batches=0, input_context=None):
  """This input pipeline's (image or encoded image, label, element seed) stream.

  Shuffling, seeding and skipping act on the global stream, so it is a function of
  `seed` alone whatever the number of workers; sharding comes last and, for large
  sets, before decoding, so each worker decodes and augments only its own images.
  """
  encoded = source.streams_encoded
  if encoded:
    ds = source.train_encoded
  else:
    ds = source.train.cache() if source.in_memory else source.train
  ds = ds.shuffle(min(shuffle_buffer, source.num_train), seed=seed,
                  reshuffle_each_iteration=True).repeat()
  seeds = tf.data.Dataset.random(seed=seed)
  ds = tf.data.Dataset.zip((ds, seeds))
  if skip_batches:
    ds = ds.skip(skip_batches * global_batch_size)
  ds = ds.map(as_written(lambda example, element_seed: (*example, element_seed)))
  if input_context is not None:
    ds = shard_of_batches(ds, global_batch_size, input_context.num_input_pipelines,
                          input_context.input_pipeline_id)
  return ds, encoded


def views_of(image_size, views, mean, std):
  """(uint8 image, label, element seed) -> (both views stacked, label)."""
  def make_views(image, label, element_seed):
    # uint8 in: each view converts only its crop to float.
    base = tf.stack([element_seed, tf.constant(0, tf.int64)])
    seeds = tf.unstack(tf.random.experimental.stateless_split(base, num=2))
    return tf.stack(augment.augment_views(image, image_size, views, mean, std,
                                          seeds)), label
  return as_written(make_views)


def two_view_dataset(source, *, global_batch_size, image_size, views, mean, std,
                     seed, shuffle_buffer=10000, deterministic=False, skip_batches=0,
                     input_context=None):
  """Infinite dataset of (views, labels) batches.

  views is (batch, 2, size, size, 3): both views stacked in one tensor. Labels are
  used only by the optional online probe, never by the loss.

  Without `input_context`, batches are global batches. With one (the argument
  `strategy.distribute_datasets_from_function` passes), this is one worker's input
  pipeline: it yields per-replica batches holding this worker's part of each global
  batch, and the worker's replicas take them in turn, so replica r of worker w gets
  the slice of the global batch it would get from one process holding every replica.

  Decoded images are cached when the source is small; each element gets its own
  augmentation seed from a seeded random stream, so that parallel maps stay
  reproducible. Batches drop the remainder so that every replica gets the same
  number of images.

  The stream is a function of `seed` alone: `skip_batches=k` gives exactly what the
  same dataset gives after k batches, without augmenting the skipped images (and,
  for large sets, without decoding them), so a resumed run sees the data an
  uninterrupted run would have seen.
  """
  ds, encoded = element_stream(source, global_batch_size=global_batch_size, seed=seed,
                               shuffle_buffer=shuffle_buffer, skip_batches=skip_batches,
                               input_context=input_context)
  if encoded:
    ds = decode_skipping_errors(ds, True if deterministic else None,
                                are_paths=source.encoded_are_paths)
  # Parallel maps keep their output order unless told otherwise, and each element
  # carries its own seed: the stream is reproducible in either case; `deterministic`
  # only forbids tf.data from relaxing the order for speed.
  ds = ds.map(views_of(image_size, views, mean, std), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True if deterministic else None)
  batch = (input_context.get_per_replica_batch_size(global_batch_size)
           if input_context is not None else global_batch_size)
  ds = ds.batch(batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Feeding from a tf.data service.
# ----------------------------------------------------------------------------

# Elements a tf.data service worker takes from the dispatcher at once.
SERVICE_CHUNK = 64


def indexed_elements(source, seed, first=0, chunk=SERVICE_CHUNK):
  """(path, label, element seed) of the global elements first, first + 1, ...

  Element i belongs to epoch e = i // N, which holds every image once, in the order
  of a permutation drawn from (seed, e) (`index_shuffle`); its augmentation seed is
  drawn from (seed, i). Both are functions of the index alone, so any worker can make
  any element. The stream's source is a range of chunk numbers: what a tf.data
  service's dispatcher splits among its workers.
  """
  scan = source.scans[0]       # the training split's files
  paths = tf.constant(scan.paths)
  labels = tf.constant(scan.labels, tf.int64)
  n = len(scan.paths)
  epoch_key = tf.constant([seed, 1], tf.int64)
  element_key = tf.constant([seed, 2], tf.int64)

  def element(i):
    order = tf.random.experimental.stateless_fold_in(epoch_key, i // n)
    j = tf.random.experimental.index_shuffle(i % n, order, n - 1)
    element_seed = tf.random.stateless_uniform(
        [], seed=tf.random.experimental.stateless_fold_in(element_key, i),
        minval=None, maxval=None, dtype=tf.int64)
    return tf.gather(paths, j), tf.gather(labels, j), element_seed

  chunks = tf.data.Dataset.range(first // chunk, 2**62 // chunk)
  ds = chunks.flat_map(lambda c: tf.data.Dataset.range(c * chunk, (c + 1) * chunk))
  return ds.filter(lambda i: i >= first).map(element)


def service_two_view_dataset(source, *, service, job_name, global_batch_size,
                             image_size, views, mean, std, seed, skip_batches=0,
                             input_context=None):
  """`two_view_dataset` with the reading, decoding and augmentation done by the
  workers of a tf.data service (`service`: its dispatcher, grpc://host:port), which
  split the stream of `indexed_elements` among them (dynamic sharding); batches
  are made here. The trainers of one run share the job `job_name`, so each element
  goes to one of them.

  Which images an epoch holds and each image's augmentation are functions of `seed`
  and the element's index, whatever the number of workers; the order in which
  elements arrive, and so which batch holds them, is the order the workers finish
  them in.
  """
  ds = indexed_elements(source, seed, first=skip_batches * global_batch_size)
  ds = decode_skipping_errors(ds)
  ds = ds.map(views_of(image_size, views, mean, std), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.prefetch(tf.data.AUTOTUNE).apply(tf.data.experimental.service.distribute(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
      service=service, job_name=job_name))
  batch = (input_context.get_per_replica_batch_size(global_batch_size)
           if input_context is not None else global_batch_size)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def check_data_service(address, timeout=5.0):
  """One line when no dispatcher answers at `address` (grpc://host:port)."""
  host, _, port = address.split("://")[-1].rpartition(":")
  if not tcp_reachable(host, port, timeout):
    raise errors.DataError(
        f"--data_service={address}: no tf.data service dispatcher answers there; start "
        "one with `python -m corinfomax_tf.data_service --role=dispatcher` (docs/distributed.md: "
        "Feeding training from a tf.data service)")


def wait_for_service_worker(address, log=print, report_every=30.0, first_report=3.0):
  """Returns once a worker of the tf.data service at `address` delivers data.

  A trainer on a dispatcher without workers would otherwise block inside TensorFlow
  without a word, where Python's SIGTERM and SIGINT handlers cannot run. Here a
  one-element probe job waits in a daemon thread while this thread says what it
  waits for, and a SIGTERM or SIGINT ends the wait (errors.Preempted: exit 143).
  """
  done, failure = threading.Event(), []

  def probe():
    try:
      ds = tf.data.Dataset.range(1).apply(tf.data.experimental.service.distribute(
          processing_mode="parallel_epochs", service=address,
          job_name=f"corinfomax_tf-probe-{uuid.uuid4().hex}"))
      for _ in ds.take(1):
        pass
    except Exception as e:  # noqa: BLE001  (reported below)
      failure.append(e)
    done.set()

  received = []

  def handler(signum, frame):
    received.append(signal.Signals(signum).name)
  previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
  start = time.monotonic()
  next_report = start + first_report
  try:
    threading.Thread(target=probe, daemon=True, name="data-service-probe").start()
    while not done.wait(0.2):
      if received:
        raise errors.Preempted(
            f"stopped by signal {received[0]} while waiting for a tf.data service worker "
            f"at {address}; nothing was trained since the last checkpoint: rerun the same "
            "command to resume")
      if time.monotonic() >= next_report:
        log(f"Waiting for a tf.data service worker at {address} ({time.monotonic() - start:.0f} "
            "s so far): start one with `python -m corinfomax_tf.data_service --role=worker "
            f"--dispatcher={address.split('://')[-1]}`")
        next_report = time.monotonic() + report_every
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)
  if failure:
    raise errors.DataError(f"--data_service={address}: the service did not deliver data "
                           f"({str(failure[0]).splitlines()[0][:200]})")


def eval_dataset(ds, *, batch_size, image_size, mean, std):
  """Finite dataset of (normalised image, label, ...) batches for feature extraction."""
  def prep(image, *rest):
    return (augment.eval_view(augment.to_float(image), image_size, mean, std), *rest)
  ds = ds.map(as_written(prep), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def resolve_image_size(data_cfg, metadata, log=print):
  """`data_cfg` (a config.DataConfig) at the encoder's training size (image_size 0:
  not given), or at the size the user gave, with one line when it differs from
  training; a backbone built for one input size (a ViT) is refused any other."""
  trained = metadata["image_size"]
  size = data_cfg.image_size or trained
  if size != trained:
    fixed = metadata.get("architecture", {}).get("input_size")
    if fixed and list(fixed) != [size, size]:
      raise errors.ConfigError(
          f"--image_size={size}: the encoder was trained at {trained} and its backbone "
          f"takes only {fixed[0]}x{fixed[1]} images; leave --image_size out")
    log(f"--image_size={size}: the encoder was trained at {trained}; using {size} as "
        "asked (leave the flag out to use the training size)")
  return dataclasses.replace(data_cfg, image_size=size)


def load_eval_source(data_cfg, encoder_image_size, num_classes=0, log=print,
                     need_labels=True):
  """The source an evaluation or fine-tuning command names (`data_cfg`: a
  config.DataConfig whose image size `resolve_image_size` has settled)."""
  del encoder_image_size  # settled by resolve_image_size
  source = load_source(data_cfg.dataset, **data_cfg.source_kwargs())
  for scan in source.scans:
    log(scan.summary())
  if need_labels and not source.labelled:
    raise errors.ConfigError(f"--dataset={data_cfg.dataset}: has no labels; this command "
                             "needs a labelled set (--dataset=folder or a "
                             "tensorflow-datasets set)")
  if num_classes and num_classes != source.num_classes:
    raise errors.ConfigError(f"--num_classes={num_classes}: --dataset={data_cfg.dataset} "
                             f"has {source.num_classes} classes")
  return source


def load_split(dataset, split, **source_kwargs):
  """One split of a data set as (uint8 image, int64 label, path) elements, for
  commands that look at a single split (embed). Paths are "" where the set has none
  (digits, tensorflow-datasets); an unlabeled `images` set is its one split.

  Returns (dataset, number of images, Source).
  """
  if dataset == "digits":
    source = digits_source(source_kwargs["image_size"])
    if split not in ("train", "test"):
      raise errors.DataError(f"--split={split}: digits has splits ['test', 'train']")
    ds, count = ((source.train, source.num_train) if split == "train"
                 else (source.test, source.num_test))
    scan = None
  elif dataset == "images":
    source = load_source(dataset, **source_kwargs)
    ds, count, scan = source.train, source.num_train, source.scans[0]
  else:
    source_kwargs.update(train_split=split, test_split=split)
    try:
      source = load_source(dataset, **source_kwargs)
    except errors.DataError as e:
      raise errors.DataError(re.sub(r"--(train_split|test_split)(?=[=:/])", "--split",
                                    str(e))) from None
    ds, count = source.test, source.num_test
    scan = source.scans[-1] if source.scans else None
  if scan is not None:
    ds = decode_skipping_errors(tf.data.Dataset.from_tensor_slices(
        (tf.constant(scan.paths), tf.constant(scan.labels, tf.int64),
         tf.constant(scan.paths))))
  else:
    ds = ds.map(lambda image, label: (image, label, tf.constant("")))
  return ds, count, source


# ----------------------------------------------------------------------------
# Any tf.data.Dataset of images (the Python API).
# ----------------------------------------------------------------------------

PAPER_VIEWS = (augment.ViewConfig(blur_prob=1.0, solarize_prob=0.0),
               augment.ViewConfig(blur_prob=0.1, solarize_prob=0.2))
"""The two views of the paper (and of the reference's CIFAR/ImageNet transforms): the
first always blurred and never solarised, the second blurred with probability 0.1 and
solarised with probability 0.2; every other setting is `ViewConfig`'s default.
`two_views(..., views=PAPER_VIEWS)` is the default."""


def _image_and_label(element):
  """An element of a user's dataset -> (uint8 image (H, W, 3), int64 label or -1)."""
  label = tf.constant(-1, tf.int64)
  if isinstance(element, dict):
    if "image" not in element:
      raise ValueError("A dataset of dicts needs an 'image' key (and optionally "
                       f"'label'). Received: keys {sorted(element)}")
    image, label = element["image"], element.get("label", label)
  elif isinstance(element, (tuple, list)):
    image, label = element[0], (element[1] if len(element) > 1 else label)
  else:
    image = element
  if image.shape.rank != 3 or image.shape[-1] not in (1, 3, None):
    raise ValueError("Expected images of shape (height, width, 3) or (height, width, 1), "
                     f"one per element (unbatch a batched dataset). Received: shape "
                     f"{tuple(image.shape)}")
  if image.dtype != tf.uint8:
    # Floats are taken as [0, 1] (what tf.image.convert_image_dtype gives).
    image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
  return _ensure_rgb(image), tf.cast(label, tf.int64)


# Images read to check the pixel kind and range of a user's dataset.
KIND_SAMPLE = 256


def _image_spec(spec):
  if isinstance(spec, dict):
    return spec.get("image")
  if isinstance(spec, (tuple, list)):
    return spec[0] if spec else None
  return spec


def check_image_kind(images, argument="images"):
  """Refuses pixels that would silently train on wrong images: uint8 (0..255) is
  taken as is, floats must lie in [0, 1] (the convention of
  tf.image.convert_image_dtype); any other dtype is a TypeError, floats outside
  [0, 1] a ValueError, each naming `argument`, the dtype and the range found in the
  first KIND_SAMPLE images."""
  spec = _image_spec(images.element_spec)
  dtype = getattr(spec, "dtype", None)
  if dtype is None or dtype == tf.uint8:
    return
  if not (dtype.is_floating or dtype.is_integer):
    raise TypeError(f"{argument}: pixels must be uint8 (0..255) or float in [0, 1]. "
                    f"Received: {argument} of dtype {dtype.name}")

  def image_of(*element):
    image = _image_spec(element[0] if len(element) == 1 else element)
    return tf.cast(image, tf.float64)
  sample = images.take(KIND_SAMPLE).map(image_of)
  low, high, count = sample.reduce(
      (tf.constant(float("inf"), tf.float64), tf.constant(float("-inf"), tf.float64),
       tf.constant(0, tf.int64)),
      lambda acc, x: (tf.minimum(acc[0], tf.reduce_min(x)),
                      tf.maximum(acc[1], tf.reduce_max(x)), acc[2] + 1))
  low, high, count = float(low), float(high), int(count)
  found = f"values {low:g}..{high:g} in the first {count} images"
  if dtype.is_integer:
    hint = ("cast them with tf.cast(image, tf.uint8)" if 0 <= low and high <= 255 else
            "scale them to uint8 0..255 or float 0..1")
    raise TypeError(f"{argument}: pixels must be uint8 (0..255) or float in [0, 1]; "
                    f"found {dtype.name} with {found}: {hint}. Received: {argument} of "
                    f"dtype {dtype.name}")
  if low < 0 or high > 1:
    hint = ("divide them by 255, or cast them to uint8" if high <= 255 and low >= 0
            else "scale them to [0, 1]")
    raise ValueError(f"{argument}: float pixels must be in [0, 1] (the convention of "
                     f"tf.image.convert_image_dtype); found {dtype.name} with {found}: "
                     f"{hint}. Received: {argument} of dtype {dtype.name}")


def source_from_dataset(images, *, name="python", num_images=None, num_classes=0):
  """A `Source` of any finite tf.data.Dataset of single images: uint8 (or float in
  [0, 1]) tensors (H, W, 3) or (H, W, 1), (image, label) pairs, or dicts with
  "image" (and "label"), as tensorflow-datasets yields them. Images may differ in
  size. Its length is the dataset's cardinality, or counted once when unknown."""
  if not isinstance(images, tf.data.Dataset):
    raise ValueError(f"Expected a tf.data.Dataset of images. Received: images={images!r}")
  check_image_kind(images)
  ds = images.map(lambda *element: _image_and_label(
      element[0] if len(element) == 1 else element), num_parallel_calls=tf.data.AUTOTUNE)
  count = num_images
  if count is None:
    cardinality = int(images.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
      raise ValueError("Expected a finite dataset (one pass over the images; it is "
                       "repeated here). Received: an infinite dataset")
    count = cardinality if cardinality >= 0 else int(ds.reduce(0, lambda n, _: n + 1))
  if count < 1:
    raise ValueError(f"The dataset holds no images. Received: {count} elements")
  return Source(name=name, train=ds, test=None, num_train=int(count), num_test=0,
                num_classes=int(num_classes), in_memory=False)


def normalization_of(normalization):
  """("imagenet" | "cifar10" | ... | (mean, std)) -> (mean tuple, std tuple)."""
  if isinstance(normalization, str):
    if normalization not in config_lib.NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {sorted(config_lib.NORMALIZATIONS)} "
                       f"or (mean, std). Received: normalization={normalization!r}")
    return config_lib.NORMALIZATIONS[normalization]
  mean, std = normalization
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def two_views(images, *, image_size, batch_size, views=PAPER_VIEWS,
              normalization="imagenet", seed=0, shuffle_buffer=10000, skip_batches=0):
  """The CorInfoMax input pipeline on any tf.data.Dataset of images.

  Shuffles (seeded, reshuffled each epoch), repeats, and gives every image two
  augmented views (random resized crop to `image_size`, flip, colour jitter,
  grayscale, blur, solarisation, as the paper's two views), normalised.

  Args:
    images: a finite tf.data.Dataset of single images (see `source_from_dataset`):
      uint8 (H, W, 3), (image, label) pairs or {"image": ..., "label": ...} dicts.
    image_size: the side of the square views.
    batch_size: the global batch size (the remainder of an epoch is dropped).
    views: two `ViewConfig`s (default: the paper's).
    normalization: a name ("imagenet", "cifar10", "cifar100", "digits") or
      (mean, std) per channel, for images in [0, 1].
    seed: the seed of the order and of every augmentation.
    shuffle_buffer: images in the shuffle buffer.
    skip_batches: start after this many batches (what a resumed run needs).

  Returns:
    An infinite tf.data.Dataset of (views, labels): views float32
    (batch, 2, image_size, image_size, 3), labels int64 (-1 without labels).

  Example:
  ```python
  images = tf.data.Dataset.from_tensor_slices(uint8_array)   # (N, H, W, 3)
  ds = corinfomax_tf.two_views(images, image_size=32, batch_size=256)
  model.fit(ds, epochs=100, steps_per_epoch=len(uint8_array) // 256)
  ```
  """
  for name, value, least in (("image_size", image_size, 8), ("batch_size", batch_size, 2)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise TypeError(f"{name} must be an integer. Received: {name}={value!r}")
    if value < least:
      raise ValueError(f"{name} must be >= {least}. Received: {name}={value!r}")
  mean, std = normalization_of(normalization)
  source = images if isinstance(images, Source) else source_from_dataset(images)
  return two_view_dataset(source, global_batch_size=batch_size, image_size=image_size,
                          views=tuple(views), mean=mean, std=std, seed=seed,
                          shuffle_buffer=shuffle_buffer, skip_batches=skip_batches)
