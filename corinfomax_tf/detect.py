r"""Detection fine-tuning: the exported encoder as the backbone of a keras-hub RetinaNet.

    python -m corinfomax_tf.detect --encoder=runs/digits/export \
        --flagfile=configs/detection_generated.cfg
    python -m corinfomax_tf.detect --encoder=runs/in1k/export \
        --flagfile=configs/detection_coco.cfg --tfds_data_dir=/data/tfds

The encoder (weights from the SavedModel, see export_lib.load_trainable_encoder)
feeds its stage outputs to RetinaNet's feature pyramid, box and class heads; all of
it is fine-tuned end to end (focal loss + Huber box loss, SGD with warm-up and
cosine). COCO-style mAP@[.5:.95], AP50 and AP75 on the test split go to TensorBoard
and detect.json. `--init=random` trains the same detector from a randomly initialised
encoder: the baseline for the pretrained one.

Data (`--dataset`): "generated" (the project's offline set of digits pasted on
backgrounds, the default), "coco_json" (a COCO-format annotation file + image folder
per split, every box checked before training), or a tfds detection set (coco/2017).

The workdir receives checkpoints (detector, optimizer, epoch; one per epoch),
TensorBoard logs under train/ and eval/, and detect.json. Re-running resumes.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from corinfomax_tf import flags as flags_lib  # noqa: E402

FLAGS = flags.FLAGS
RESULT_FILE = "detect.json"


class DetectError(ValueError):
  """Bad detection input; the message names the flag or path."""


def define_flags():
  flags.DEFINE_string("encoder", None, "Encoder export directory (or training workdir).")
  flags.DEFINE_string("workdir", "", "Checkpoints, logs and results; default: "
                      "<encoder's parent>/detect_<dataset>_<init>.")
  flags.DEFINE_enum("init", "pretrained", ["pretrained", "random"],
                    "The export's encoder weights, or a random initialisation of the "
                    "same architecture (the baseline).")
  flags.DEFINE_string("dataset", "generated",
                      "generated | coco_json | a tfds detection set (coco/2017).")
  flags.DEFINE_string("tfds_data_dir", "", "tensorflow-datasets data_dir.")
  flags.DEFINE_string("train_split", "train", "tfds training split.")
  flags.DEFINE_string("test_split", "validation", "tfds evaluation split.")
  flags.DEFINE_string("train_annotations", "", "coco_json: training annotation file.")
  flags.DEFINE_string("train_images", "", "coco_json: training image directory.")
  flags.DEFINE_string("test_annotations", "", "coco_json: test annotation file.")
  flags.DEFINE_string("test_images", "", "coco_json: test image directory.")
  flags.DEFINE_integer("num_train_images", 512, "generated: training images.")
  flags.DEFINE_integer("num_test_images", 128, "generated: test images.")
  flags.DEFINE_integer("data_seed", 0, "generated: seed of the data set.")
  flags.DEFINE_integer("image_size", 48, "Detector input size (square).")
  flags.DEFINE_integer("max_boxes", 4, "Boxes kept per image (padding above).")
  flags.DEFINE_integer("min_level", 0, "Lowest pyramid level (0: by stem).")
  flags.DEFINE_integer("max_level", 0, "Highest pyramid level (0: by stem).")
  flags.DEFINE_integer("head_convs", 2, "Convolutions in each RetinaNet head (4 in the "
                       "paper's RetinaNet).")
  flags.DEFINE_integer("epochs", 12, "Fine-tuning epochs.")
  flags.DEFINE_integer("batch_size", 16, "Batch size.")
  flags.DEFINE_float("lr", 0.01, "Peak learning rate (SGD, momentum).")
  flags.DEFINE_integer("warmup_epochs", 1, "Linear warm-up epochs.")
  flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
  flags.DEFINE_float("weight_decay", 1e-4, "Coupled L2 weight decay.")
  flags.DEFINE_float("clipnorm", 10.0, "Global gradient-norm clip (0: off).")
  flags.DEFINE_integer("eval_every_epochs", 4, "mAP on the test split every N epochs.")
  flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.")
  flags.DEFINE_integer("seed", 0, "Seed of the heads and the data order.")


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def as_float_images(images):
  import tensorflow as tf
  return tf.cast(images, tf.float32) / 255.0


def predict_boxes(detector, dataset, batch_size):
  """[(boxes, scores, labels)] and [(gt boxes, gt labels)] per test image."""
  import numpy as np
  import tensorflow as tf
  predictions, ground_truths = [], []
  size = float(detector.input_shape[1])

  # keras-hub 0.32's predict_on_batch passes a 1-tuple to decode_predictions, which
  # expects the images or an (images, targets) pair: decode explicitly instead.
  @tf.function
  def detect(images):
    return detector.decode_predictions(detector(images, training=False), images)
  for images, targets in dataset.batch(batch_size):
    out = detect(as_float_images(images))
    for i in range(int(images.shape[0])):
      n = int(out["num_detections"][i])
      boxes = np.clip(np.asarray(out["boxes"][i][:n]), 0.0, size)
      predictions.append((boxes, np.asarray(out["confidence"][i][:n]),
                          np.asarray(out["labels"][i][:n])))
      labels = targets["labels"][i].numpy()
      ground_truths.append((targets["boxes"][i].numpy()[labels >= 0], labels[labels >= 0]))
  return predictions, ground_truths


def evaluate_map(detector, dataset, num_classes, batch_size=32):
  from corinfomax_tf import detection_metrics
  predictions, ground_truths = predict_boxes(detector, dataset, batch_size)
  result = detection_metrics.coco_map(predictions, ground_truths, num_classes)
  result["detections_per_image"] = float(sum(len(p[1]) for p in predictions) /
                                         max(1, len(predictions)))
  return result


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def _epoch_callbacks(manager, epoch_var, workdir, evaluate, eval_every, epochs, images_per_epoch,
                     result, log):
  import math

  import keras
  import tensorflow as tf

  from corinfomax_tf import callbacks as callbacks_lib
  eval_writer = tf.summary.create_file_writer(os.path.join(workdir, "eval"))

  class EpochEnd(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
      logs = {k: float(v) for k, v in (logs or {}).items()}
      number = epoch + 1
      if not math.isfinite(logs.get("loss", 0.0)):
        raise callbacks_lib.NonFiniteLossError(
            f"loss is {logs.get('loss')} in epoch {number}: training stopped; the last "
            f"good checkpoint in {workdir} is kept (lower --lr)")
      result.setdefault("first_epoch_loss", logs.get("loss"))
      result["last_epoch_loss"] = logs.get("loss")
      line = (f"epoch {number}/{epochs}: loss {logs.get('loss', 0):.4f} (box "
              f"{logs.get('bbox_regression_loss', 0):.4f}, class "
              f"{logs.get('cls_logits_loss', 0):.4f}), "
              f"{images_per_epoch / (time.time() - self.start):.0f} img/s")
      if number % eval_every == 0 or number == epochs:
        scores = evaluate()
        line += (f", test mAP {100 * scores['mAP']:.2f} (AP50 {100 * scores['AP50']:.2f}, "
                 f"AP75 {100 * scores['AP75']:.2f})")
        with eval_writer.as_default(step=number):
          for key in ("mAP", "AP50", "AP75"):
            tf.summary.scalar(f"detection/{key}", 100 * scores[key])
        eval_writer.flush()
        result.update({k: v for k, v in scores.items()})
        result.setdefault("history", []).append(
            dict(epoch=number, mAP=scores["mAP"], AP50=scores["AP50"]))
      epoch_var.assign(number)
      callbacks_lib.save_checkpoint(manager, number)
      log(line)
  return [EpochEnd()]


def run_detection(encoder, metadata, source, *, workdir, image_size=48, epochs=12,
                  batch_size=16, lr=0.01, warmup_epochs=1, momentum=0.9, weight_decay=1e-4,
                  clipnorm=10.0, min_level=0, max_level=0, head_convs=2,
                  eval_every_epochs=4, keep_checkpoints=2, seed=0, init="pretrained",
                  provenance=None, log=print):
  """Fine-tunes a RetinaNet on `encoder`; returns the result dict (detect.json)."""
  import keras
  import tensorflow as tf

  from corinfomax_tf import detector as detector_lib
  from corinfomax_tf import atomic_files
  from corinfomax_tf import schedules
  os.makedirs(workdir, exist_ok=True)
  keras.utils.set_random_seed(seed)
  detector = detector_lib.build_detector(
      encoder, metadata, source.num_classes, image_size=image_size, min_level=min_level,
      max_level=max_level, head_convs=head_convs)
  steps_per_epoch = source.num_train // batch_size
  if steps_per_epoch < 1:
    raise DetectError(f"--batch_size={batch_size}: larger than the {source.num_train} "
                      "training images")
  total = steps_per_epoch * epochs
  schedule = schedules.WarmupCosine(base_lr=lr, total_steps=total,
                                    warmup_steps=min(warmup_epochs * steps_per_epoch, total),
                                    warmup_start_lr=lr * 0.01, min_lr=0.0)
  optimizer = schedules.ReferenceSGD(schedule, momentum=momentum,
                                     l2_weight_decay=weight_decay,
                                     global_clipnorm=clipnorm or None)
  detector.compile(optimizer=optimizer)
  optimizer.build(detector.trainable_variables)
  epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
  checkpoint = tf.train.Checkpoint(detector=detector, optimizer=optimizer, epoch=epoch_var)
  manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, "checkpoints"),
                                       max_to_keep=keep_checkpoints)
  if manager.latest_checkpoint:
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    log(f"Resumed from {manager.latest_checkpoint} (epoch {int(epoch_var.numpy())})")

  result_path = os.path.join(workdir, RESULT_FILE)
  result = {}
  if os.path.exists(result_path):
    with open(result_path) as fh:
      result = json.load(fh)
  start_epoch = int(epoch_var.numpy())
  test = source.test.cache()
  if start_epoch >= epochs and "mAP" in result:
    log(f"Already trained: {epochs} epochs in {workdir}")
    return result

  train = source.train.cache() if source.num_train <= 20000 else source.train
  train = train.shuffle(min(source.num_train, 10000), seed=seed,
                        reshuffle_each_iteration=True).repeat()
  train = train.map(lambda image, target: (as_float_images(image), target),
                    num_parallel_calls=tf.data.AUTOTUNE)
  train = train.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  log(f"{source.num_train} training / {source.num_test} test images, "
      f"{source.num_classes} classes; {steps_per_epoch} steps of {batch_size} per epoch")
  callbacks = _epoch_callbacks(
      manager, epoch_var, workdir,
      lambda: evaluate_map(detector, test, source.num_classes),
      eval_every_epochs, epochs, steps_per_epoch * batch_size, result, log)
  callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, "logs"),
                                               write_graph=False, update_freq="epoch"))
  detector.fit(train, epochs=epochs, initial_epoch=start_epoch,
               steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=0,
               shuffle=False)
  result.update(init=init, epochs=epochs, batch_size=batch_size, lr=lr,
                image_size=image_size, num_train=source.num_train,
                num_test=source.num_test, num_classes=source.num_classes,
                class_names=list(source.class_names), seed=seed,
                parameters=int(detector.count_params()), **(provenance or {}))
  atomic_files.write_json_atomic(result_path, result, indent=2, sort_keys=True)
  return result


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def load_detection_source(f):
  from corinfomax_tf import detection_data
  if f.dataset == detection_data.GENERATED:
    for name in ("num_train_images", "num_test_images"):
      if getattr(f, name) < 1:
        raise DetectError(f"--{name}={getattr(f, name)}: must be >= 1")
    return detection_data.generated_source(
        image_size=f.image_size, num_train=f.num_train_images,
        num_test=f.num_test_images, seed=f.data_seed, max_boxes=f.max_boxes)
  if f.dataset == detection_data.COCO_JSON:
    for name in ("train_annotations", "train_images", "test_annotations", "test_images"):
      if not getattr(f, name):
        raise DetectError(f"--{name} is required with --dataset=coco_json")
    return detection_data.coco_json_source(
        f.train_annotations, f.train_images, f.test_annotations, f.test_images,
        image_size=f.image_size, max_boxes=f.max_boxes)
  return detection_data.tfds_detection_source(
      f.dataset, f.tfds_data_dir or None, f.train_split, f.test_split,
      image_size=f.image_size, max_boxes=f.max_boxes)


def _check_flags(f):
  checks = [("epochs", f.epochs >= 1, "must be >= 1"),
            ("batch_size", f.batch_size >= 1, "must be >= 1"),
            ("lr", f.lr > 0, "must be > 0"),
            ("image_size", f.image_size >= 16, "must be >= 16"),
            ("max_boxes", f.max_boxes >= 1, "must be >= 1"),
            ("head_convs", f.head_convs >= 1, "must be >= 1"),
            ("eval_every_epochs", f.eval_every_epochs >= 1, "must be >= 1"),
            ("keep_checkpoints", f.keep_checkpoints >= 1, "must be >= 1"),
            ("warmup_epochs", f.warmup_epochs >= 0, "must be >= 0")]
  for name, ok, requirement in checks:
    if not ok:
      raise DetectError(f"--{name}={getattr(f, name)}: {requirement}")


def main(argv):
  flags_lib.begin_command(argv, FLAGS, encoder_help="an encoder export directory")
  from corinfomax_tf import callbacks as callbacks_lib
  from corinfomax_tf import data as data_lib
  from corinfomax_tf import detector as detector_lib
  from corinfomax_tf import export_lib
  from corinfomax_tf import finetune
  try:
    _check_flags(FLAGS)
    encoder, metadata = export_lib.load_trainable_encoder(FLAGS.encoder)
    detector_lib.levels_for(metadata["architecture"]["stem"], FLAGS.min_level,
                            FLAGS.max_level)
    if FLAGS.init == "random":
      encoder = finetune.random_encoder_like(metadata, FLAGS.seed + 1)
    source = load_detection_source(FLAGS)
    workdir = FLAGS.workdir or os.path.join(
        os.path.dirname(os.path.normpath(FLAGS.encoder)) or ".",
        f"detect_{FLAGS.dataset.replace('/', '_')}_{FLAGS.init}")
    result = run_detection(
        encoder, metadata, source, workdir=workdir, image_size=FLAGS.image_size,
        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
        warmup_epochs=FLAGS.warmup_epochs, momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, clipnorm=FLAGS.clipnorm,
        min_level=FLAGS.min_level, max_level=FLAGS.max_level, head_convs=FLAGS.head_convs,
        eval_every_epochs=FLAGS.eval_every_epochs, keep_checkpoints=FLAGS.keep_checkpoints,
        seed=FLAGS.seed, init=FLAGS.init,
        provenance=dict(encoder=os.path.abspath(FLAGS.encoder),
                        encoder_step=metadata["step"], dataset=FLAGS.dataset),
        log=lambda line: print(line, flush=True))
  except (DetectError, detector_lib.DetectorError, export_lib.ExportError,
          data_lib.DataError, callbacks_lib.NonFiniteLossError,
          callbacks_lib.CheckpointWriteError) as e:
    flags_lib.exit_with_error(str(e))
  print(json.dumps({k: v for k, v in result.items()
                    if k not in ("history", "per_class_AP", "class_names")}, sort_keys=True),
        flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)
