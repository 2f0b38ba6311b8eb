r"""Linear evaluation of a frozen encoder, the paper's protocol.

    python -m corinfomax_tf.linear_eval --flagfile=configs/linear_cifar10.cfg \
        --encoder=runs/c10/export

The encoder is an export (export/export_encoder.py) or a training workdir. A linear
classifier is trained on its pooled features: 100 epochs, batch 256, SGD momentum 0.9,
no weight decay, cosine 0.2 -> 2e-3 (ImageNet-1K: lr 25 divided by 10 every 20 epochs,
`--schedule=step`). Training images get the reference's evaluation-time augmentation
(random resized crop + flip); test images are resized to size*8/7 and centre-cropped.
With `--noaugment --precompute_features` the features of the un-augmented training
images are computed once (much faster; not the paper's protocol, and the JSON says so).

Top-1 and top-5 on the test split go to <output_dir>/linear_eval.json and to
TensorBoard under <output_dir>/train and <output_dir>/eval.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from corinfomax_tf import flags as flags_lib  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  flags_lib.define_data_flags()
  flags.DEFINE_string("encoder", None, "Encoder export directory or training workdir.")
  flags.DEFINE_string("output_dir", "",
                      "Where results go; default: <encoder's parent>/linear_eval.")
  flags.DEFINE_integer("num_classes", 0, "Expected class count (0: the data set's).")
  flags.DEFINE_integer("epochs", 100, "Epochs of the linear classifier.")
  flags.DEFINE_integer("batch_size", 256, "Batch size.")
  flags.DEFINE_float("lr", 0.2, "Base learning rate.")
  flags.DEFINE_float("min_lr", 2e-3, "Final learning rate of the cosine schedule.")
  flags.DEFINE_enum("schedule", "cosine", ["cosine", "step"],
                    "cosine (lr -> min_lr) or step (divide by 10 every --step_epochs).")
  flags.DEFINE_integer("step_epochs", 20, "Step schedule: epochs between decays.")
  flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
  flags.DEFINE_float("weight_decay", 0.0, "Coupled L2 weight decay.")
  flags.DEFINE_bool("augment", True, "Random resized crop + flip on training images.")
  flags.DEFINE_float("crop_min_scale", 0.08, "Random resized crop: smallest area share.")
  flags.DEFINE_bool("precompute_features", False,
                    "Compute training features once (requires --noaugment).")
  flags.DEFINE_integer("eval_every_epochs", 10, "Test-split evaluation interval.")
  flags.DEFINE_integer("seed", 0, "Seed of the classifier and data order.")


class EvalError(ValueError):
  """Bad evaluation input; the message names the flag or path."""


def load_source_for(encoder_metadata, f):
  """The data source named by the flags, checked against the encoder."""
  from corinfomax_tf import data as data_lib
  if f.image_size != encoder_metadata["image_size"]:
    raise EvalError(f"--image_size={f.image_size}: the encoder was trained at "
                    f"{encoder_metadata['image_size']}; evaluate at the same size")
  source = data_lib.load_source(
      f.dataset, image_size=f.image_size, data_dir=f.data_dir or None,
      tfds_data_dir=f.tfds_data_dir or None, train_split=f.train_split,
      test_split=f.test_split, tfds_download=f.tfds_download,
      image_check=f.image_check, bad_images=f.bad_images,
      max_image_pixels=f.max_image_pixels)
  for scan in source.scans:
    print(scan.summary(), flush=True)
  expected = getattr(f, "num_classes", 0)
  if expected and expected != source.num_classes:
    raise EvalError(f"--num_classes={expected}: --dataset={f.dataset} has "
                    f"{source.num_classes} classes")
  return source


def eval_images(split, image_size, batch_size=256):
  """Resize-and-centre-crop float images in [0, 1] (normalisation is in the encoder)."""
  from corinfomax_tf import data as data_lib
  return data_lib.eval_dataset(split, batch_size=batch_size, image_size=image_size,
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def features_of(encoder, dataset):
  import numpy as np
  feats, labels = [], []
  for images, y in dataset:
    feats.append(encoder(images).numpy())
    labels.append(y.numpy())
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def check_labels(labels, num_classes, split):
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise EvalError(f"--{split}: labels in [{labels.min()}, {labels.max()}] do not fit "
                    f"{num_classes} classes")


def augmented_images(source, image_size, batch_size, crop_min_scale, seed):
  import tensorflow as tf

  from corinfomax_tf import augment
  ds = source.train.cache() if source.in_memory else source.train
  ds = ds.shuffle(min(10000, source.num_train), seed=seed, reshuffle_each_iteration=True)
  seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

  def prep(example, element_seed):
    image, label = example
    return augment.crop_and_flip(image, image_size, crop_min_scale, 0.5, element_seed,
                                 salt=1), label
  ds = tf.data.Dataset.zip((ds, seeds)).map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def run_linear_eval(encoder, source, *, image_size, epochs=100, batch_size=256, lr=0.2,
                    min_lr=2e-3, schedule="cosine", step_epochs=20, momentum=0.9,
                    weight_decay=0.0, augment=True, precompute_features=False,
                    crop_min_scale=0.08, eval_every_epochs=10, seed=0, logdir=None,
                    log=print):
  """Trains the linear classifier; returns the result dict (top1/top5 in percent)."""
  import keras
  import numpy as np
  import tensorflow as tf

  from corinfomax_tf import evaluation
  from corinfomax_tf import schedules
  if precompute_features and augment:
    raise EvalError("--precompute_features: requires --noaugment (augmented images "
                    "give new features every epoch)")
  keras.utils.set_random_seed(seed)
  num_classes = source.num_classes
  test_x, test_y = features_of(encoder, eval_images(source.test, image_size))
  check_labels(test_y, num_classes, "test_split")
  if augment:
    train_ds = augmented_images(source, image_size, batch_size, crop_min_scale, seed)
  elif precompute_features:
    train_x, train_y = features_of(encoder, eval_images(source.train, image_size))
    check_labels(train_y, num_classes, "train_split")
    train_ds = tf.data.Dataset.from_tensor_slices((train_x, train_y)).shuffle(
        len(train_y), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
  else:
    train_ds = eval_images(source.train.shuffle(min(10000, source.num_train), seed=seed),
                           image_size, batch_size)
  steps_per_epoch = -(-source.num_train // batch_size)
  total = steps_per_epoch * epochs
  if schedule == "cosine":
    lr_fn = schedules.WarmupCosine(base_lr=lr, total_steps=total, warmup_steps=0,
                                   min_lr=min_lr)
  else:
    lr_fn = schedules.step_schedule(lr, range(step_epochs, epochs, step_epochs), 0.1,
                                    steps_per_epoch)
  head = keras.layers.Dense(num_classes, name="linear")
  head.build((None, int(test_x.shape[1])))
  optimizer = schedules.ReferenceSGD(lr_fn, momentum=momentum, l2_weight_decay=weight_decay)
  optimizer.build(head.trainable_variables)
  featurize = (lambda x: x) if precompute_features else encoder

  @tf.function(reduce_retracing=True)
  def train_step(features, labels):
    with tf.GradientTape() as tape:
      logits = head(features)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.cast(labels, tf.int32), logits=logits))
    optimizer.apply(tape.gradient(loss, head.trainable_variables),
                    head.trainable_variables)
    return loss, tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.int32))

  writers = None
  if logdir:
    writers = (tf.summary.create_file_writer(os.path.join(logdir, "train")),
               tf.summary.create_file_writer(os.path.join(logdir, "eval")))
  result = {}
  for epoch in range(1, epochs + 1):
    losses, correct, seen = [], 0, 0
    for images, labels in train_ds:
      features = tf.stop_gradient(featurize(images))
      labels = tf.cast(labels, tf.int64)
      loss, hits = train_step(features, labels)
      losses.append(float(loss))
      correct += int(hits)
      seen += int(labels.shape[0])
    train_top1 = 100.0 * correct / max(seen, 1)
    if epoch % eval_every_epochs == 0 or epoch == epochs:
      scores = head(tf.constant(test_x)).numpy()
      result = evaluation.topk_accuracy(scores, test_y)
      log(f"epoch {epoch}/{epochs}: loss {np.mean(losses):.4f}, train top-1 "
          f"{train_top1:.2f}%, test top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%")
      if writers:
        with writers[1].as_default(step=epoch):
          for k, v in result.items():
            tf.summary.scalar(f"linear_eval/{k}", v)
    if writers:
      with writers[0].as_default(step=epoch):
        tf.summary.scalar("linear_eval/loss", float(np.mean(losses)))
        tf.summary.scalar("linear_eval/train_top1", train_top1)
        tf.summary.scalar("linear_eval/learning_rate",
                          float(lr_fn(optimizer.iterations - 1)))
  if writers:
    for w in writers:
      w.flush()
  protocol = ("paper: frozen encoder, augmented training images" if augment else
              "precomputed features of un-augmented training images (not the paper's "
              "protocol)" if precompute_features else "un-augmented training images")
  return {**result, "epochs": epochs, "batch_size": batch_size, "lr": lr,
          "schedule": schedule, "protocol": protocol, "num_train": source.num_train,
          "num_test": source.num_test, "num_classes": num_classes}


def output_dir_for(f, name="linear_eval"):
  """--output_dir, or <encoder's parent>/<name>, created."""
  out = f.output_dir or os.path.join(
      os.path.dirname(os.path.normpath(f.encoder)) or ".", name)
  os.makedirs(out, exist_ok=True)
  return out


def write_result(out, name, result, f, encoder):
  """Adds what was evaluated, writes <out>/<name>.json and prints it as one line."""
  result = {**result, "encoder": os.path.abspath(f.encoder),
            "encoder_step": encoder.metadata["step"], "dataset": f.dataset}
  with open(os.path.join(out, f"{name}.json"), "w") as fh:
    json.dump(result, fh, indent=2, sort_keys=True)
  print(json.dumps(result, sort_keys=True), flush=True)


def main(argv):
  flags_lib.begin_command(argv, FLAGS, encoder_help="an export directory or a training workdir")
  from corinfomax_tf import data as data_lib
  from corinfomax_tf import export_lib
  try:
    encoder = export_lib.load_encoder(FLAGS.encoder)
    source = load_source_for(encoder.metadata, FLAGS)
    out = output_dir_for(FLAGS)
    result = run_linear_eval(
        encoder, source, image_size=FLAGS.image_size, epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, lr=FLAGS.lr, min_lr=FLAGS.min_lr,
        schedule=FLAGS.schedule, step_epochs=FLAGS.step_epochs, momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, augment=FLAGS.augment,
        precompute_features=FLAGS.precompute_features,
        crop_min_scale=FLAGS.crop_min_scale, eval_every_epochs=FLAGS.eval_every_epochs,
        seed=FLAGS.seed, logdir=out)
  except (EvalError, export_lib.ExportError, data_lib.DataError) as e:
    flags_lib.exit_with_error(str(e))
  write_result(out, "linear_eval", result, FLAGS, encoder)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)
