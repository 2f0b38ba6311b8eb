"""Encoder throughput of ONNX Runtime against the SavedModel, on this CPU.

    rows = time_runtimes(cases=((18, 32), (50, 224)), batch_size=64)   # (depth, px)

Each case exports a randomly initialised encoder (our ResNet, CIFAR stem at 32 px,
ImageNet stem at 224 px) as a SavedModel and as encoder.onnx in a temporary folder,
checks that both give the same features, then alternates timed rounds of one batch
of uint8 images through each (the SavedModel's serving_default; an ONNX Runtime
session on every core) and reports the median images/s of each and their ratio.
"""

import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf

from corinfomax_tf.export import runtimes, saved_model
from corinfomax_tf.models import factory


def _seconds(fn, images):
  start = time.perf_counter()
  fn(images)
  return time.perf_counter() - start


def time_case(depth, size, batch_size=64, rounds=5):

  stem = "cifar" if size <= 64 else "imagenet"
  backbone = factory.encoder(depth, stem, 64)
  metadata = {"format": saved_model.FORMAT, "image_size": size, "step": 0,
              "architecture": factory.architecture(backbone),
              "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
  with tempfile.TemporaryDirectory() as tmp:
    saved_model.build_archive(backbone, metadata).write_out(tmp, verbose=False)
    files = runtimes.write_runtime_files(backbone, metadata, tmp, litert=False)
    loaded = tf.saved_model.load(tmp)
    serve = loaded.signatures["serving_default"]
    images = np.random.RandomState(0).randint(0, 256, (batch_size, size, size, 3)).astype(
        np.uint8)

    def tensorflow_fn(x):
      return serve(images=tf.constant(x))["features"].numpy()
    session = runtimes.onnx_session(f"{tmp}/{files['onnx']}")

    def onnx_fn(x):
      return session.run(None, {"images": x})[0]
    # Also the warm-up (tracing, allocation) of both.
    difference = runtimes.relative_difference(onnx_fn(images), tensorflow_fn(images))
    tf_times, onnx_times = [], []
    for _ in range(rounds):   # alternated: a noisy neighbour slows both alike
      tf_times.append(_seconds(tensorflow_fn, images))
      onnx_times.append(_seconds(onnx_fn, images))
  tf_rate = batch_size / statistics.median(tf_times)
  onnx_rate = batch_size / statistics.median(onnx_times)
  return {"encoder": f"resnet{depth}", "image_size": size, "batch_size": batch_size,
          "savedmodel_images_per_s": tf_rate, "onnxruntime_images_per_s": onnx_rate,
          "onnx_over_savedmodel": onnx_rate / tf_rate, "relative_difference": difference}


def time_runtimes(cases=((18, 32), (50, 224)), batch_size=64, rounds=5):
  return [time_case(depth, size, batch_size, rounds) for depth, size in cases]
