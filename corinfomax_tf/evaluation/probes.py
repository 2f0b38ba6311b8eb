"""Quick evaluation of a frozen encoder: pooled features -> linear probe top-1.

This is the post-pretraining check of the training job (a softmax classifier on
standardised, precomputed features; no augmentation), not the paper's 100-epoch
linear-evaluation protocol with augmentations.
"""

import keras
import numpy as np
import tensorflow as tf

from corinfomax_tf import errors
from corinfomax_tf.data import datasets


def batch_features(encoder, spec):
  """images (a batch of `spec`) -> NumPy pooled features: `encoder` (a Keras encoder or
  an export's `FrozenEncoder`) traced once for every batch size (the last batch is
  smaller), or called eagerly where it runs outside TensorFlow (ONNX Runtime)."""
  if getattr(encoder, "outside_tensorflow", False):
    return lambda images: np.asarray(encoder(images.numpy()))
  if keras.backend.backend() != "tensorflow":
    # Keras of another backend (a run on JAX): the model's own compiled predict
    # (`CorInfoMax.features` is its `call`), else an eager call.
    owner = getattr(encoder, "__self__", None)
    if isinstance(owner, keras.Model) and encoder.__name__ == "features":
      encoder = owner
    if isinstance(encoder, keras.Model):
      return lambda images: np.asarray(encoder.predict_on_batch(images.numpy()))
    return lambda images: np.asarray(encoder(images.numpy(), training=False))

  @tf.function(input_signature=[tf.TensorSpec((None,) + tuple(spec.shape[1:]), spec.dtype)])
  def features(images):
    return encoder(images, training=False)
  return lambda images: features(images).numpy()


def extract_features(encoder, dataset):
  """Pooled features of every batch of a finite (images, labels) dataset (`encoder`:
  a Keras encoder or an export's `FrozenEncoder`)."""
  features = batch_features(encoder, dataset.element_spec[0])
  feats, labels = [], []
  for images, y in dataset:
    feats.append(features(images))
    labels.append(y.numpy())
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int64)


def linear_probe(train_x, train_y, test_x, test_y, num_classes, *, epochs=100,
                 batch_size=256, learning_rate=1e-3, seed=0, min_steps=500):
  """Trains a linear softmax classifier on standardised features.

  Runs at least `min_steps` updates (small sets have few batches per epoch).
  Returns {"top1": ..., "top5": ...} on the test features, in percent.
  """
  steps_per_epoch = -(-len(train_y) // batch_size)
  epochs = max(epochs, -(-min_steps // steps_per_epoch))
  if train_y.min() < 0 or train_y.max() >= num_classes:
    raise ValueError(f"labels must be in [0, {num_classes}). "
                     f"Received: labels in [{train_y.min()}, {train_y.max()}]")
  mean = train_x.mean(axis=0, keepdims=True)
  std = train_x.std(axis=0, keepdims=True) + 1e-6
  train_x = (train_x - mean) / std
  test_x = (test_x - mean) / std
  classifier = train_classifier(train_x, train_y, num_classes, epochs=epochs,
                                batch_size=batch_size, learning_rate=learning_rate,
                                seed=seed)
  scores = classifier.predict(test_x, batch_size=1024, verbose=0)
  return topk_accuracy(scores, test_y)


def train_classifier(train_x, train_y, num_classes, *, epochs, batch_size,
                     learning_rate, seed):
  """A Dense softmax classifier trained with Adam for `epochs` passes over the arrays.

  The updates are those of `fit(train_x, train_y, shuffle=True)` on Keras 3's arrays,
  bit for bit (tests/test_evaluation.py checks it against fit): on TensorFlow, that fit
  draws its permutation inside a tf.data function whose random op has a fixed seed, so
  every epoch (a new iterator) sees the same order. Here that order is drawn once and
  the epochs are one repeated dataset, run 32 steps per call: fit's per-epoch start
  (a new iterator and the epoch's callbacks, about 30 ms) dominated small sets, 500
  one-batch epochs taking 15 s. Other backends shuffle anew every epoch: they keep fit.
  """
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(shape=(train_x.shape[1],))
  logits = keras.layers.Dense(num_classes)(inputs)
  classifier = keras.Model(inputs, logits)
  on_tensorflow = keras.backend.backend() == "tensorflow"
  classifier.compile(
      optimizer=keras.optimizers.Adam(learning_rate),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      steps_per_execution=32 if on_tensorflow else 1)
  if not on_tensorflow:
    classifier.fit(train_x, train_y, batch_size=batch_size, epochs=epochs, verbose=0,
                   shuffle=True)
    return classifier
  order = next(iter(_fit_order(len(train_y))))
  batches = tf.data.Dataset.from_tensor_slices(
      (tf.gather(train_x, order), tf.gather(train_y, order)))
  classifier.fit(batches.batch(batch_size).repeat(epochs), epochs=1, verbose=0,
                 shuffle=False)
  return classifier


def _fit_order(num_samples):
  """The permutation of Keras 3's array adapter (`ArrayDataAdapter.get_tf_dataset`),
  made by the same ops in the same order, so that its random op gets the same seed."""
  def permutation(_):
    indices = tf.range(num_samples, dtype=tf.int64)
    indices = tf.random.shuffle(indices)
    return indices
  return tf.data.Dataset.range(1).map(permutation)


def eval_images(split, image_size, batch_size=256):
  """Resize-and-centre-crop float images in [0, 1], for an encoder that normalises
  inside (an export)."""
  return datasets.eval_dataset(split, batch_size=batch_size, image_size=image_size,
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def check_labels(labels, num_classes, split):
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.ConfigError(f"--{split}: labels in [{labels.min()}, {labels.max()}] do "
                             f"not fit {num_classes} classes")


def topk_accuracy(scores, labels, ks=(1, 5)):
  order = np.argsort(-scores, axis=1)
  result = {}
  for k in ks:
    k_eff = min(k, scores.shape[1])
    hit = (order[:, :k_eff] == labels[:, None]).any(axis=1)
    result[f"top{k}"] = float(100.0 * hit.mean())
  return result


def probe_encoder(encoder, train_ds, test_ds, num_classes, *, epochs=100, seed=0):
  """Features of both splits through `encoder`, then `linear_probe`."""
  train_x, train_y = extract_features(encoder, train_ds)
  test_x, test_y = extract_features(encoder, test_ds)
  return linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=epochs,
                      seed=seed)


def knn_classify(train_x, train_y, test_x, num_classes, *, k=200, temperature=0.07,
                 chunk=1024):
  """Weighted kNN on cosine similarity (Wu et al. 2018, as the SSL literature reports
  it): the k most similar training features vote for their class with weight
  exp(similarity / temperature). Returns class scores (num_test, num_classes)."""
  train = tf.math.l2_normalize(tf.constant(train_x, tf.float32), axis=1)
  labels = tf.constant(train_y, tf.int64)
  k = min(k, train_x.shape[0])
  scores = []
  for start in range(0, test_x.shape[0], chunk):
    query = tf.math.l2_normalize(tf.constant(test_x[start:start + chunk], tf.float32), 1)
    sim = tf.matmul(query, train, transpose_b=True)
    top_sim, top_idx = tf.math.top_k(sim, k=k)
    weights = tf.exp(top_sim / temperature)
    votes = tf.one_hot(tf.gather(labels, top_idx), num_classes) * weights[..., None]
    scores.append(tf.reduce_sum(votes, axis=1).numpy())
  return np.concatenate(scores)


def knn_evaluate(train_x, train_y, test_x, test_y, num_classes, *, ks=(20, 200),
                 temperature=0.07):
  """{"k20_top1": ..., "k200_top1": ...} in percent."""
  result = {}
  for k in ks:
    scores = knn_classify(train_x, train_y, test_x, num_classes, k=k,
                          temperature=temperature)
    result[f"k{k}_top1"] = topk_accuracy(scores, test_y, ks=(1,))["top1"]
  return result
