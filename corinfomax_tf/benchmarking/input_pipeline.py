"""Input-pipeline rates: the two-view augmentation against plain JPEG decoding.

`imagenet_like_folder` generates (once, then reuses) a folder of realistic JPEGs cut
from scikit-learn's two sample photos at ImageNet's typical sizes (mostly 500x375 and
375x500; quality 95 and mild noise: about 85 KB a file, ImageNet's average is about
110 KB); `time_input_only` times, in one process, plain read + decode and the full
two-view training pipeline over it, both through tf.data with the same parallelism,
and reports images/s per core and their ratio.
`time_pipeline` times the pipeline of a configured data set (the step benchmark's).
"""

import os
import tempfile
import time

import numpy as np
import sklearn.datasets
import tensorflow as tf
from PIL import Image

from corinfomax_tf import errors
from corinfomax_tf.data import datasets
from corinfomax_tf.data import datasets as data_lib

# ImageNet's most common (height, width) pairs, with weights close to their shares.
IMAGENET_SHAPES = (((375, 500), 0.45), ((500, 375), 0.15), ((333, 500), 0.12),
                   ((500, 333), 0.05), ((400, 500), 0.08), ((480, 640), 0.08),
                   ((300, 400), 0.07))
JPEG_QUALITY = 95


def imagenet_like_folder(count, seed=0, root=None):
  """A folder of `count` ImageNet-like JPEGs (made once; reused when complete)."""
  root = root or os.path.join(tempfile.gettempdir(),
                              f"corinfomax_tf_imagenet_like_{count}_{seed}")
  done = os.path.join(root, ".complete")
  if os.path.exists(done):
    return root
  os.makedirs(root, exist_ok=True)
  photos = [np.asarray(p) for p in sklearn.datasets.load_sample_images().images]
  rs = np.random.RandomState(seed)
  shapes = [s for s, _ in IMAGENET_SHAPES]
  weights = np.asarray([w for _, w in IMAGENET_SHAPES])
  for i in range(count):
    photo = photos[rs.randint(len(photos))]
    h, w = shapes[rs.choice(len(shapes), p=weights / weights.sum())]
    # A random region of the photo at the target aspect, 40-100% of its height.
    ph, pw = photo.shape[:2]
    ch = int(ph * rs.uniform(0.4, 1.0))
    cw = min(pw, int(ch * w / h))
    ch = min(ch, int(cw * h / w))
    top, left = rs.randint(ph - ch + 1), rs.randint(pw - cw + 1)
    region = Image.fromarray(photo[top:top + ch, left:left + cw])
    image = region.resize((w, h), Image.BICUBIC)
    # A colour cast, and sensor-like noise: the upscaled sample photos alone are
    # smoother than photographs, and would decode faster than ImageNet's JPEGs.
    pixels = (np.asarray(image, np.float32) * rs.uniform(0.8, 1.2, (1, 1, 3))
              + rs.normal(0.0, 4.0, (h, w, 3)))
    if rs.rand() < 0.5:
      pixels = pixels[:, ::-1]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(root, f"img_{i:05d}.jpg"), quality=JPEG_QUALITY)
  open(done, "w").close()
  return root


def _rates(dataset, images_per_element, elements):
  """(images per wall-clock second, images per CPU second of this process) over
  `elements` elements of a fresh iterator, after one untimed element (start-up,
  thread pools, autotuning). The iterator is dropped afterwards, so that its
  background threads do not compete with the next timing.

  The CPU-time rate counts the work an image costs, whatever the share of the cores
  the process got: on a shared machine it varies less than the wall-clock rate."""
  it = iter(dataset)
  next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(elements):
    next(it)
  images = elements * images_per_element
  rates = (images / (time.perf_counter() - start), images / (time.process_time() - cpu))
  del it
  return rates


def _rate(dataset, images_per_element, elements):
  return _rates(dataset, images_per_element, elements)[0]


def alternating_rates(datasets, images_per_element, elements, rounds=5):
  """{name: [images/s per round]} and {name: [images per CPU second per round]}: the
  pipelines timed in turn, round after round, so that a machine whose speed drifts
  (shared or throttled cores) affects all alike."""
  wall = {name: [] for name in datasets}
  cpu = {name: [] for name in datasets}
  for _ in range(rounds):
    for name, ds in datasets.items():
      w, c = _rates(ds, images_per_element, elements)
      wall[name].append(w)
      cpu[name].append(c)
  return wall, cpu


def decode_dataset(paths, batch_size):
  """Plain read + decode of every file, as the training pipeline decodes it (batched
  as their shapes, since the images' sizes differ)."""

  ds = tf.data.Dataset.from_tensor_slices((paths, tf.zeros(len(paths), tf.int64)))
  ds = datasets.decode_skipping_errors(ds.repeat()).map(lambda image, _: tf.shape(image))
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def time_input_only(cfg, *, batch_size=64, batches=10, images=256, rounds=5, root=None):
  """Plain JPEG decode and the full two-view pipeline at cfg's image size and
  augmentation, on an ImageNet-like folder, images/s per core and their ratio."""

  folder = imagenet_like_folder(images, root=root)
  source = datasets.load_source("images", image_size=cfg.data.image_size, data_dir=folder)
  paths = list(source.scans[0].paths)
  cores = os.cpu_count() or 1
  two_view = datasets.two_view_dataset(
      source, global_batch_size=batch_size, image_size=cfg.data.image_size,
      views=(cfg.augment.view1, cfg.augment.view2), mean=cfg.data.mean,
      std=cfg.data.std, seed=0)
  rates, cpu_rates = alternating_rates({"decode": decode_dataset(paths, batch_size),
                                       "two_view": two_view}, batch_size, batches, rounds)
  ratios = [t / d for t, d in zip(rates["two_view"], rates["decode"])]
  decode, two_view = (float(np.median(rates[k])) for k in ("decode", "two_view"))
  cpu_decode, cpu_two_view = (float(np.median(cpu_rates[k])) for k in ("decode", "two_view"))
  return {
      "imagenet_like_images_per_s_per_core": two_view / cores,
      "jpeg_decode_images_per_s_per_core": decode / cores,
      "ratio_to_decode": float(np.median(ratios)),
      "ratio_to_decode_per_round": ratios,
      "imagenet_like_images_per_s": two_view, "jpeg_decode_images_per_s": decode,
      "imagenet_like_images_per_cpu_s": cpu_two_view,
      "jpeg_decode_images_per_cpu_s": cpu_decode,
      "imagenet_like_images_per_s_per_core_per_round": [r / cores for r in rates["two_view"]],
      "cores": cores, "image_size": cfg.data.image_size, "batch_size": batch_size,
      "timed_images_per_round": batch_size * batches, "rounds": rounds,
      "folder": folder, "folder_images": len(paths),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "method": "decode and two-view pipelines timed in turn, each round on a fresh "
                "iterator after one untimed batch; medians over the rounds (the ratio: "
                "median of the per-round ratios); tf.data parallel maps (AUTOTUNE) over "
                "all cores; per CPU second: images over the process's CPU time"}


def synthetic_source(image_size, count=4096):
  """Random uint8 images of the training size, for when the data set is absent."""

  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (count, image_size, image_size, 3)).astype(np.uint8)
  labels = np.zeros(count, np.int64)
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  return data_lib.Source("synthetic", ds, ds, count, count, 1, in_memory=True)


def time_pipeline(cfg, batch_size, batches, workers=1):
  """Input pipeline rates, in global-batch images per second: the whole pipeline,
  and (workers > 1) worker 0's pipeline when `workers` workers share each global
  batch, i.e. how fast one worker feeds its part. The source is loaded as training
  loads it (an image folder is decoded per step unless --cache)."""

  d = cfg.data
  try:
    source = data_lib.load_source(d.dataset, **{**d.source_kwargs(), "tfds_download": False})
  except errors.DataError:
    # Decoded, cached images cost the same to augment whatever their content.
    source = synthetic_source(d.image_size)

  def rate(context):
    ds = data_lib.two_view_dataset(source, global_batch_size=batch_size,
                                   image_size=d.image_size,
                                   views=(cfg.augment.view1, cfg.augment.view2),
                                   mean=d.mean, std=d.std, seed=0, input_context=context)
    return _rate(ds, batch_size, batches)

  whole = rate(None)
  cores = os.cpu_count() or 1
  result = {"images_per_second": whole, "images_per_second_per_core": whole / cores,
            "cores": cores, "source": source.name,
            "decoded_per_step": source.streams_encoded}
  if workers > 1:
    # Worker 0 of `workers`, one replica each: per-replica batches of B / workers.
    one = rate(tf.distribute.InputContext(workers, 0, workers))
    result["sharded"] = {"workers": workers, "global_images_per_second_one_worker": one,
                         "speedup_vs_whole": one / whole}
  return result
