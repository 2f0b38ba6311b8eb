r"""Semi-supervised fine-tuning of an encoder on a fraction of the labels.

The encoder (trainable, BatchNorm in training mode) and a linear head are trained end
to end with cross-entropy on a class-balanced labelled subset: the reference's
protocol is 20 epochs, SGD momentum 0.9, backbone lr 0.005, head lr 10 (1%) or 20
(10%), no weight decay, a step schedule (both rates times `lr_decay_factor` at each of
`lr_decay_epochs`). Training images get random resized crops and flips; the test
split is resized and centre-cropped.

The workdir (see training/epochs.py) receives label_subset.json (the labelled
indices, re-read on resume), checkpoints/ (one per epoch: encoder, head, both
optimizers, epoch), TensorBoard logs under train/ and eval/, progress.json and
finetune.json. Every epoch is a function of (seed, epoch): a resumed run ends where an
uninterrupted one does.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from corinfomax_tf import errors
from corinfomax_tf.data import augment, label_subsets
from corinfomax_tf.evaluation import probes
from corinfomax_tf.export import saved_model
from corinfomax_tf.models import backbone as backbone_lib
from corinfomax_tf.training import epochs as epochs_lib
from corinfomax_tf.training import schedules

RESULT_FILE = "finetune.json"


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def train_labels(source):
  """Labels of the training split in its fixed order (what subset indices refer to)."""
  if source.scans:  # image folders: known without reading a pixel
    return np.asarray(source.scans[0].labels, np.int64)
  labels = source.train.map(lambda image, label: label)
  return np.fromiter((int(y) for y in labels.as_numpy_iterator()), np.int64)


def labelled_examples(source, indices):
  """The labelled (image, label) examples, in the training split's order; cached
  decoded when the source is small, so that later epochs neither re-read the split
  nor re-filter it."""
  mask = np.zeros(source.num_train, bool)
  mask[indices] = True
  mask = tf.constant(mask)
  ds = source.train.enumerate().filter(lambda i, example: tf.gather(mask, i))
  ds = ds.map(lambda i, example: example)
  return ds.cache() if source.in_memory else ds


def labelled_images(examples, num_labelled, *, image_size, batch_size, crop_min_scale,
                    hflip_prob, seed, epoch):
  """One epoch of augmented labelled batches; a function of (seed, epoch) alone, so
  a resumed run sees what an uninterrupted one would have."""

  ds = examples.shuffle(num_labelled, seed=seed * 100_003 + epoch)
  seeds = tf.data.Dataset.random(seed=seed * 100_003 + epoch)

  def prep(example, element_seed):
    image, label = example
    return augment.crop_and_flip(image, image_size, crop_min_scale, hflip_prob,
                                 element_seed, salt=2), label
  ds = tf.data.Dataset.zip((ds, seeds)).map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  # Full batches only: BatchNorm in training mode on a last batch of 1 or 2 images
  # would be noise.
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------
# Model and training.
# ----------------------------------------------------------------------------


def evaluate(encoder, head, dataset, mean, std):

  scores, labels = [], []
  for images, y in dataset:
    scores.append(head(encoder((images - mean) / std, training=False)).numpy())
    labels.append(y.numpy())
  return probes.topk_accuracy(np.concatenate(scores), np.concatenate(labels))


def _model(encoder, num_classes, steps_per_epoch, cfg):
  """The head and the two optimizers (backbone, head), built."""

  keras.utils.set_random_seed(cfg.seed)
  head = keras.layers.Dense(num_classes, name="head")
  head.build((None, encoder.feature_dim))
  optimizers = []
  for lr, variables in ((cfg.backbone_lr, encoder.trainable_variables),
                        (cfg.head_lr, head.trainable_variables)):
    optimizer = schedules.ReferenceSGD(
        schedules.step_schedule(lr, cfg.lr_decay_epochs, cfg.lr_decay_factor,
                                steps_per_epoch),
        momentum=cfg.momentum, l2_weight_decay=cfg.weight_decay)
    optimizer.build(variables)
    optimizers.append(optimizer)
  return head, optimizers[0], optimizers[1]


def _train_step(encoder, head, opt_backbone, opt_head, mean, std):

  @tf.function(reduce_retracing=True)
  def train_step(images, labels):
    with tf.GradientTape() as tape:
      logits = head(encoder((images - mean) / std, training=True))
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.cast(labels, tf.int32), logits=logits))
    grads = tape.gradient(loss, encoder.trainable_variables + head.trainable_variables)
    n = len(encoder.trainable_variables)
    opt_backbone.apply(grads[:n], encoder.trainable_variables)
    opt_head.apply(grads[n:], head.trainable_variables)
    hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.int32))
    return loss, hits
  return train_step


def _train_epoch(train_step, batches, epoch, workdir):
  """(losses, correct, seen) of one epoch; a non-finite loss stops before any save."""

  losses, correct, seen = [], 0, 0
  for images, labels in batches:
    labels = tf.cast(labels, tf.int64)
    loss, hits = train_step(images, labels)
    loss = float(loss)
    if not np.isfinite(loss):
      raise errors.TrainingStopped(
          f"loss is {loss} in epoch {epoch}: fine-tuning stopped; the last good "
          f"checkpoint in {workdir} is kept (lower --backbone_lr/--head_lr)")
    losses.append(loss)
    correct += int(hits)
    seen += int(labels.shape[0])
  return losses, correct, seen


def run_finetune(backbone, metadata, source, cfg, log=print):
  """Fine-tunes (or resumes) `backbone` (a CorInfoMaxBackbone: normalised images in),
  pooled, + a linear head as `cfg` (a config.FinetuneConfig) says; returns the result
  dict, also written to <workdir>/finetune.json."""

  encoder = backbone_lib.pooled_model(backbone)
  if cfg.deterministic:
    tf.config.experimental.enable_op_determinism()
  with epochs_lib.EpochRun.open(cfg, command="corinfomax_tf.finetune",
                                result_file=RESULT_FILE, log=log,
                                encoder=metadata.get("identity")) as run:
    if run.finished is not None:
      log(f"Already fine-tuned: {cfg.epochs} epochs in {cfg.workdir}")
      return run.finished
    mean = tf.constant(metadata["normalization"]["mean"], tf.float32)
    std = tf.constant(metadata["normalization"]["std"], tf.float32)
    indices = label_subsets.subset_for_workdir(cfg.workdir, train_labels(source),
                                               cfg.label_fraction, cfg.subset_seed,
                                               source.num_classes)
    batch_size = min(cfg.batch_size, len(indices))
    steps_per_epoch = len(indices) // batch_size
    log(f"{len(indices)} labelled training images ({cfg.label_fraction:g} of "
        f"{source.num_train}, subset seed {cfg.subset_seed}), {steps_per_epoch} steps of "
        f"{batch_size} per epoch")
    head, opt_backbone, opt_head = _model(encoder, source.num_classes, steps_per_epoch, cfg)
    start = run.restore(encoder=encoder, head=head, opt_backbone=opt_backbone,
                        opt_head=opt_head)
    train_step = _train_step(encoder, head, opt_backbone, opt_head, mean, std)
    test_ds = probes.eval_images(source.test, metadata["image_size"])
    examples = labelled_examples(source, indices)
    writers = (tf.summary.create_file_writer(run.workdir.join("train")),
               tf.summary.create_file_writer(run.workdir.join("eval")))
    for epoch in range(start + 1, cfg.epochs + 1):
      began = time.time()
      losses, correct, seen = _train_epoch(train_step, labelled_images(
          examples, len(indices), image_size=metadata["image_size"], batch_size=batch_size,
          crop_min_scale=cfg.crop_min_scale, hflip_prob=cfg.hflip_prob, seed=cfg.seed,
          epoch=epoch), epoch, cfg.workdir)
      run.progress.setdefault("first_step_loss", losses[0])
      run.progress["last_epoch_loss"] = float(np.mean(losses))
      line = (f"epoch {epoch}/{cfg.epochs}: loss {np.mean(losses):.4f}, train top-1 "
              f"{100.0 * correct / max(seen, 1):.2f}%, {seen / (time.time() - began):.0f} img/s")
      with writers[0].as_default(step=epoch):
        tf.summary.scalar("finetune/loss", float(np.mean(losses)))
        tf.summary.scalar("finetune/train_top1", 100.0 * correct / max(seen, 1))
        tf.summary.scalar("finetune/backbone_lr", float(opt_backbone.learning_rate))
        tf.summary.scalar("finetune/head_lr", float(opt_head.learning_rate))
      if epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs:
        scores = evaluate(encoder, head, test_ds, mean, std)
        line += f", test top-1 {scores['top1']:.2f}%, top-5 {scores['top5']:.2f}%"
        with writers[1].as_default(step=epoch):
          for key, value in scores.items():
            tf.summary.scalar(f"finetune/{key}", value)
        run.record(epoch, **scores)
      run.end_epoch(epoch)
      log(line)
    for w in writers:
      w.flush()
    return run.finish(dict(
        **run.last_record(), init=cfg.init, label_fraction=cfg.label_fraction,
        subset_seed=cfg.subset_seed, num_labelled=int(len(indices)),
        num_train=source.num_train, num_test=source.num_test,
        num_classes=source.num_classes, batch_size=batch_size,
        backbone_lr=cfg.backbone_lr, head_lr=cfg.head_lr,
        lr_decay_epochs=list(cfg.lr_decay_epochs), lr_decay_factor=cfg.lr_decay_factor,
        weight_decay=cfg.weight_decay, seed=cfg.seed,
        **saved_model.provenance(cfg.encoder, metadata, cfg.data.dataset,
                                 metadata.get("identity"))))
