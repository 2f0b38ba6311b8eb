r"""Semi-supervised fine-tuning of an exported encoder on a fraction of the labels.

    python -m corinfomax_tf.finetune --encoder=runs/in1k/export \
        --flagfile=configs/semisup_imagenet1k_1pct.cfg
    python -m corinfomax_tf.finetune --encoder=runs/digits/export \
        --flagfile=configs/semisup_digits_10pct.cfg

The encoder (weights from the SavedModel, trainable, BatchNorm in training mode) and a
linear head are trained end to end with cross-entropy on a class-balanced labelled
subset: the reference's protocol is 20 epochs, SGD momentum 0.9, backbone lr 0.005,
head lr 10 (1%) or 20 (10%), no weight decay, a step schedule (here: both rates times
--lr_decay_factor at each of --lr_decay_epochs). Training images get random resized
crops and flips; the test split is resized and centre-cropped.

`--init=random` trains the same network from a random initialisation with the same
labels and settings: the baseline the pretrained encoder has to beat.

The workdir receives label_subset.json (the labelled indices, re-read on resume),
checkpoints/ (one per epoch: encoder, head, both optimizers, epoch), TensorBoard logs
under train/ and eval/, and finetune.json. Re-running the command resumes.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from corinfomax_tf import flags as flags_lib  # noqa: E402

FLAGS = flags.FLAGS
RESULT_FILE = "finetune.json"


class FinetuneError(ValueError):
  """Bad fine-tuning input; the message names the flag or path."""


def define_flags():
  flags_lib.define_data_flags()
  flags.DEFINE_string("encoder", None, "Encoder export directory (or training workdir).")
  flags.DEFINE_string("workdir", "", "Checkpoints, logs, label subset and results; "
                      "default: <encoder's parent>/finetune_<fraction>_<init>.")
  flags.DEFINE_enum("init", "pretrained", ["pretrained", "random"],
                    "Start from the export's weights, or from a random initialisation "
                    "of the same architecture (the from-scratch baseline).")
  flags.DEFINE_float("label_fraction", 0.1,
                     "Share of each class's training images that keep their label, in "
                     "(0, 1]; 1 with the tfds imagenet2012_subset sets.")
  flags.DEFINE_integer("subset_seed", 0, "Seed of the labelled subset.")
  flags.DEFINE_integer("epochs", 20, "Fine-tuning epochs.")
  flags.DEFINE_integer("batch_size", 256, "Batch size.")
  flags.DEFINE_float("backbone_lr", 0.005, "Learning rate of the encoder.")
  flags.DEFINE_float("head_lr", 10.0, "Learning rate of the linear head.")
  flags.DEFINE_list("lr_decay_epochs", ["12", "16"], "Epochs at which both rates decay.")
  flags.DEFINE_float("lr_decay_factor", 0.2, "Factor applied at each decay epoch.")
  flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
  flags.DEFINE_float("weight_decay", 0.0, "Coupled L2 weight decay.")
  flags.DEFINE_float("crop_min_scale", 0.08, "Random resized crop: smallest area share.")
  flags.DEFINE_float("hflip_prob", 0.5, "Horizontal flip probability.")
  flags.DEFINE_integer("eval_every_epochs", 5, "Test-split evaluation interval.")
  flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
  flags.DEFINE_integer("seed", 0, "Seed of the head, data order and augmentation.")


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def train_labels(source):
  """Labels of the training split in its fixed order (what subset indices refer to)."""
  import numpy as np
  if source.scans:  # image folders: known without reading a pixel
    return np.asarray(source.scans[0].labels, np.int64)
  labels = source.train.map(lambda image, label: label)
  return np.fromiter((int(y) for y in labels.as_numpy_iterator()), np.int64)


def labelled_examples(source, indices):
  """The labelled (image, label) examples, in the training split's order; cached
  decoded when the source is small, so that later epochs neither re-read the split
  nor re-filter it."""
  import numpy as np
  import tensorflow as tf
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
  import tensorflow as tf

  from corinfomax_tf import augment
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


def random_encoder_like(metadata, seed):
  import keras

  from corinfomax_tf.models import resnet
  keras.utils.set_random_seed(seed)
  arch = metadata["architecture"]
  return resnet.ResNetEncoder(depth=arch["depth"], stem=arch["stem"], width=arch["width"],
                              name="encoder")


def evaluate(encoder, head, dataset, mean, std):
  import numpy as np

  from corinfomax_tf import evaluation
  scores, labels = [], []
  for images, y in dataset:
    scores.append(head(encoder((images - mean) / std, training=False)).numpy())
    labels.append(y.numpy())
  return evaluation.topk_accuracy(np.concatenate(scores), np.concatenate(labels))


def run_finetune(encoder, metadata, source, *, workdir, label_fraction=0.1, subset_seed=0,
                 epochs=20, batch_size=256, backbone_lr=0.005, head_lr=10.0,
                 lr_decay_epochs=(12, 16), lr_decay_factor=0.2, momentum=0.9,
                 weight_decay=0.0, crop_min_scale=0.08, hflip_prob=0.5,
                 eval_every_epochs=5, keep_checkpoints=2, seed=0, init="pretrained",
                 provenance=None, log=print):
  """Fine-tunes `encoder` (normalised-input Keras encoder) + a linear head; returns
  the result dict and writes it to <workdir>/finetune.json."""
  import keras
  import numpy as np
  import tensorflow as tf

  from corinfomax_tf import callbacks as callbacks_lib
  from corinfomax_tf import label_subsets
  from corinfomax_tf import linear_eval
  from corinfomax_tf import atomic_files
  from corinfomax_tf import schedules
  os.makedirs(workdir, exist_ok=True)
  image_size = metadata["image_size"]
  mean = tf.constant(metadata["normalization"]["mean"], tf.float32)
  std = tf.constant(metadata["normalization"]["std"], tf.float32)
  num_classes = source.num_classes

  indices = label_subsets.subset_for_workdir(workdir, train_labels(source), label_fraction,
                                             subset_seed, num_classes)
  batch_size = min(batch_size, len(indices))
  steps_per_epoch = len(indices) // batch_size
  log(f"{len(indices)} labelled training images ({label_fraction:g} of "
      f"{source.num_train}, subset seed {subset_seed}), {steps_per_epoch} steps of "
      f"{batch_size} per epoch")

  keras.utils.set_random_seed(seed)
  head = keras.layers.Dense(num_classes, name="head")
  head.build((None, encoder.feature_dim))
  opt_backbone = schedules.ReferenceSGD(
      schedules.step_schedule(backbone_lr, lr_decay_epochs, lr_decay_factor, steps_per_epoch),
      momentum=momentum, l2_weight_decay=weight_decay)
  opt_head = schedules.ReferenceSGD(
      schedules.step_schedule(head_lr, lr_decay_epochs, lr_decay_factor, steps_per_epoch),
      momentum=momentum, l2_weight_decay=weight_decay)
  opt_backbone.build(encoder.trainable_variables)
  opt_head.build(head.trainable_variables)
  epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
  checkpoint = tf.train.Checkpoint(encoder=encoder, head=head, opt_backbone=opt_backbone,
                                   opt_head=opt_head, epoch=epoch_var)
  manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, "checkpoints"),
                                       max_to_keep=keep_checkpoints)
  if manager.latest_checkpoint:
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    log(f"Resumed from {manager.latest_checkpoint} (epoch {int(epoch_var.numpy())})")

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

  test_ds = linear_eval.eval_images(source.test, image_size)
  examples = labelled_examples(source, indices)
  writers = (tf.summary.create_file_writer(os.path.join(workdir, "train")),
             tf.summary.create_file_writer(os.path.join(workdir, "eval")))
  result_path = os.path.join(workdir, RESULT_FILE)
  result = {}
  if os.path.exists(result_path):
    with open(result_path) as fh:
      result = json.load(fh)
  if int(epoch_var.numpy()) >= epochs and "top1" in result:
    log(f"Already fine-tuned: {epochs} epochs in {workdir}")
    return result
  initial_loss = None
  for epoch in range(int(epoch_var.numpy()) + 1, epochs + 1):
    start, losses, correct, seen = time.time(), [], 0, 0
    for images, labels in labelled_images(
        examples, len(indices), image_size=image_size, batch_size=batch_size,
        crop_min_scale=crop_min_scale, hflip_prob=hflip_prob, seed=seed, epoch=epoch):
      labels = tf.cast(labels, tf.int64)
      loss, hits = train_step(images, labels)
      loss = float(loss)
      if not np.isfinite(loss):
        raise callbacks_lib.NonFiniteLossError(
            f"loss is {loss} in epoch {epoch}: fine-tuning stopped; the last good "
            f"checkpoint in {workdir} is kept (lower --backbone_lr/--head_lr)")
      losses.append(loss)
      correct += int(hits)
      seen += int(labels.shape[0])
    if initial_loss is None:
      initial_loss = losses[0]
    epoch_var.assign(epoch)
    callbacks_lib.save_checkpoint(manager, epoch)
    line = (f"epoch {epoch}/{epochs}: loss {np.mean(losses):.4f}, train top-1 "
            f"{100.0 * correct / max(seen, 1):.2f}%, {seen / (time.time() - start):.0f} img/s")
    with writers[0].as_default(step=epoch):
      tf.summary.scalar("finetune/loss", float(np.mean(losses)))
      tf.summary.scalar("finetune/train_top1", 100.0 * correct / max(seen, 1))
      tf.summary.scalar("finetune/backbone_lr", float(opt_backbone.learning_rate))
      tf.summary.scalar("finetune/head_lr", float(opt_head.learning_rate))
    if epoch % eval_every_epochs == 0 or epoch == epochs:
      scores = evaluate(encoder, head, test_ds, mean, std)
      line += f", test top-1 {scores['top1']:.2f}%, top-5 {scores['top5']:.2f}%"
      with writers[1].as_default(step=epoch):
        for key, value in scores.items():
          tf.summary.scalar(f"finetune/{key}", value)
      result.update(scores)
      result.setdefault("history", []).append(dict(epoch=epoch, **scores))
    result["last_epoch_loss"] = float(np.mean(losses))
    if initial_loss is not None:
      result.setdefault("first_step_loss", initial_loss)
    log(line)
  for w in writers:
    w.flush()
  result.update(
      init=init, label_fraction=label_fraction, subset_seed=subset_seed,
      num_labelled=int(len(indices)), num_train=source.num_train,
      num_test=source.num_test, num_classes=num_classes, epochs=epochs,
      batch_size=batch_size, backbone_lr=backbone_lr, head_lr=head_lr,
      lr_decay_epochs=[int(e) for e in lr_decay_epochs], lr_decay_factor=lr_decay_factor,
      weight_decay=weight_decay, seed=seed, **(provenance or {}))
  atomic_files.write_json_atomic(result_path, result, indent=2, sort_keys=True)
  return result


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _validated_args(f):
  from corinfomax_tf import label_subsets
  label_subsets.validate_fraction(f.label_fraction)
  checks = [("epochs", f.epochs >= 1, "must be >= 1"),
            ("batch_size", f.batch_size >= 2, "must be >= 2"),
            ("backbone_lr", f.backbone_lr >= 0, "must be >= 0"),
            ("head_lr", f.head_lr > 0, "must be > 0"),
            ("lr_decay_factor", 0 < f.lr_decay_factor <= 1, "must be in (0, 1]"),
            ("momentum", 0 <= f.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", f.weight_decay >= 0, "must be >= 0"),
            ("crop_min_scale", 0 < f.crop_min_scale <= 1, "must be in (0, 1]"),
            ("hflip_prob", 0 <= f.hflip_prob <= 1, "must be in [0, 1]"),
            ("eval_every_epochs", f.eval_every_epochs >= 1, "must be >= 1"),
            ("keep_checkpoints", f.keep_checkpoints >= 1, "must be >= 1")]
  for name, ok, requirement in checks:
    if not ok:
      raise FinetuneError(f"--{name}={getattr(f, name)}: {requirement}")
  try:
    decay = [int(e) for e in f.lr_decay_epochs]
  except ValueError:
    decay = [-1]
  if any(e < 1 for e in decay) or decay != sorted(decay):
    raise FinetuneError(f"--lr_decay_epochs={','.join(f.lr_decay_epochs)}: must be "
                        "increasing positive epochs")
  return decay


def default_workdir(f):
  return os.path.join(os.path.dirname(os.path.normpath(f.encoder)) or ".",
                      f"finetune_{f.label_fraction:g}_{f.init}")


def main(argv):
  flags_lib.begin_command(argv, FLAGS, encoder_help="an encoder export directory")
  from corinfomax_tf import callbacks as callbacks_lib
  from corinfomax_tf import data as data_lib
  from corinfomax_tf import export_lib
  from corinfomax_tf import label_subsets
  from corinfomax_tf import linear_eval
  try:
    decay = _validated_args(FLAGS)
    encoder, metadata = export_lib.load_trainable_encoder(FLAGS.encoder)
    if FLAGS.init == "random":
      encoder = random_encoder_like(metadata, FLAGS.seed + 1)
    source = linear_eval.load_source_for(metadata, FLAGS)
    workdir = FLAGS.workdir or default_workdir(FLAGS)
    result = run_finetune(
        encoder, metadata, source, workdir=workdir, label_fraction=FLAGS.label_fraction,
        subset_seed=FLAGS.subset_seed, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
        backbone_lr=FLAGS.backbone_lr, head_lr=FLAGS.head_lr, lr_decay_epochs=decay,
        lr_decay_factor=FLAGS.lr_decay_factor, momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, crop_min_scale=FLAGS.crop_min_scale,
        hflip_prob=FLAGS.hflip_prob, eval_every_epochs=FLAGS.eval_every_epochs,
        keep_checkpoints=FLAGS.keep_checkpoints, seed=FLAGS.seed, init=FLAGS.init,
        provenance=dict(encoder=os.path.abspath(FLAGS.encoder),
                        encoder_step=metadata["step"], dataset=FLAGS.dataset),
        log=lambda line: print(line, flush=True))
  except (FinetuneError, label_subsets.SubsetError, export_lib.ExportError,
          data_lib.DataError, linear_eval.EvalError, callbacks_lib.NonFiniteLossError,
          callbacks_lib.CheckpointWriteError) as e:
    flags_lib.exit_with_error(str(e))
  print(json.dumps({k: v for k, v in result.items() if k != "history"}, sort_keys=True),
        flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)
