"""What the encoder learned, to look at: the pooled features of every image of a set,
a TensorBoard Projector view of them, and nearest-neighbour queries.

Pure functions (`nearest`, `sprite`, `thumbnail_size`, `metadata_lines`) carry the
maths and layout; `embed` runs the encoder over a dataset; `write_projector` writes
what `tensorboard --logdir DIR` reads (projector_config.pbtxt, a checkpoint holding
the embedding matrix, metadata.tsv, sprite.png).
"""

import math
import os

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorboard.plugins import projector

from corinfomax_tf.evaluation import probes

ARRAYS_FILE = "embeddings.npz"
METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"
CHECKPOINT_PREFIX = "embedding"
# The name TensorFlow 2 checkpoints give tf.train.Checkpoint(embedding=variable).
TENSOR_NAME = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
# The Projector draws sprites of at most 8192 x 8192 pixels.
MAX_SPRITE_PIXELS = 8192
MAX_THUMBNAIL = 64
MIN_THUMBNAIL = 4


def thumbnail_size(count, image_size):
  """Side of each sprite thumbnail for `count` images (0: too many for a sprite)."""
  per_row = max(1, math.ceil(math.sqrt(count)))
  size = min(image_size, MAX_THUMBNAIL, MAX_SPRITE_PIXELS // per_row)
  return size if size >= MIN_THUMBNAIL else 0


def sprite(thumbnails):
  """(n, t, t, 3) uint8 -> one square grid of ceil(sqrt(n)) thumbnails a side,
  row-major, blank cells at the end (the layout the Projector expects)."""
  n, t = thumbnails.shape[0], thumbnails.shape[1]
  per_row = max(1, math.ceil(math.sqrt(n)))
  cells = np.zeros((per_row * per_row, t, t, 3), np.uint8)
  cells[:n] = thumbnails
  return cells.reshape(per_row, per_row, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(
      per_row * t, per_row * t, 3)


def _cell(value):
  return str(value).replace("\t", " ").replace("\n", " ")


def metadata_lines(count, labels=None, class_names=(), paths=None):
  """The Projector's metadata.tsv: a header, then one row per image (index, and the
  label, class name and path where they exist)."""
  columns = [("index", [str(i) for i in range(count)])]
  if labels is not None:
    columns.append(("label", [str(int(y)) for y in labels]))
    if class_names:
      columns.append(("class", [_cell(class_names[y]) if 0 <= y < len(class_names)
                                else "" for y in labels]))
  if paths is not None:
    columns.append(("path", [_cell(p) for p in paths]))
  lines = ["\t".join(name for name, _ in columns)]
  lines += ["\t".join(values) for values in zip(*(v for _, v in columns))]
  return lines


def nearest(features, queries, k):
  """(indices, cosine similarities), each (num_queries, k): the k rows of `features`
  most similar to each query, most similar first (ties: lower index first)."""
  f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
  sim = q.astype(np.float64) @ f.astype(np.float64).T
  k = min(k, features.shape[0])
  order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(sim, order, axis=1)


def embed(encoder, dataset, thumbnail=0):
  """Runs a frozen encoder over batches of (images in [0, 1], labels, paths).

  Returns dict(features (n, d) float32, labels (n,) int64, paths (n,) str, thumbnails
  (n, t, t, 3) uint8 or None).
  """

  spec = dataset.element_spec[0]
  features = probes.batch_features(encoder, spec)

  @tf.function(input_signature=[tf.TensorSpec((None,) + tuple(spec.shape[1:]),
                                              spec.dtype)])
  def thumbnails(images):
    thumbs = (tf.image.resize(images, (thumbnail, thumbnail), antialias=True)
              if thumbnail else images[:, :1, :1])
    return tf.cast(tf.clip_by_value(tf.round(thumbs * 255.0), 0, 255), tf.uint8)

  feats, labels, paths, thumbs = [], [], [], []
  for images, y, p in dataset:
    feats.append(features(images))
    thumbs.append(thumbnails(images).numpy())
    labels.append(y.numpy())
    paths.extend(s.decode("utf-8", "replace") for s in p.numpy())
  if not feats:
    return None
  return dict(features=np.concatenate(feats).astype(np.float32),
              labels=np.concatenate(labels).astype(np.int64), paths=np.asarray(paths),
              thumbnails=np.concatenate(thumbs) if thumbnail else None)


def write_projector(directory, features, lines, sprite_image=None, thumbnail=0):
  """The files `tensorboard --logdir directory` shows in its Projector tab."""
  with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as fh:
    fh.write("\n".join(lines) + "\n")
  for name in os.listdir(directory):  # an earlier run's matrix
    if name == "checkpoint" or name.startswith(CHECKPOINT_PREFIX + "-"):
      os.remove(os.path.join(directory, name))
  # Saved with its state file, so that the Projector finds it relative to the logdir
  # (the directory can be moved).
  checkpoint = tf.train.Checkpoint(embedding=tf.Variable(features, trainable=False))
  checkpoint.save(os.path.join(directory, CHECKPOINT_PREFIX))
  config = projector.ProjectorConfig()
  entry = config.embeddings.add()
  entry.tensor_name = TENSOR_NAME
  entry.metadata_path = METADATA_FILE
  if sprite_image is not None:
    Image.fromarray(sprite_image).save(os.path.join(directory, SPRITE_FILE))
    entry.sprite.image_path = SPRITE_FILE
    entry.sprite.single_image_dim.extend([thumbnail, thumbnail])
  projector.visualize_embeddings(directory, config)
