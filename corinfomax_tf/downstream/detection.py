"""Detection fine-tuning: the encoder as the backbone of a keras-hub RetinaNet.

The encoder feeds its stage outputs to RetinaNet's feature pyramid, box and class
heads (models/detector.py); all of it is fine-tuned end to end (focal loss + Huber
box loss, SGD with warm-up and cosine). COCO-style mAP@[.5:.95], AP50 and AP75 on the
test split go to TensorBoard and detect.json.

The workdir (see training/epochs.py) receives checkpoints (detector, optimizer,
epoch; one per epoch), TensorBoard logs under train/, eval/ and logs/, progress.json
and detect.json. Every epoch's order is a function of (seed, epoch): a resumed run
ends where an uninterrupted one does.
"""

import math
import time
import weakref

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from corinfomax_tf import errors
from corinfomax_tf.evaluation import detection_metrics
from corinfomax_tf.export import saved_model
from corinfomax_tf.models import detector as detector_lib
from corinfomax_tf.training import epochs as epochs_lib
from corinfomax_tf.training import schedules

RESULT_FILE = "detect.json"
# Training images whose mAP is measured beside the test split's.
TRAIN_EVAL_IMAGES = 128
# Boxes whose anchor coverage is reported before training.
COVERAGE_IMAGES = 1000
_DETECT_FUNCTIONS = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def as_float_images(images):
  return tf.cast(images, tf.float32) / 255.0


def predict_boxes(detector, dataset, batch_size):
  """[(boxes, scores, labels)] and [(gt boxes, gt labels)] per test image."""
  predictions, ground_truths = [], []
  size = float(detector.input_shape[1])

  detect = _DETECT_FUNCTIONS.get(detector)
  if detect is None:
    # keras-hub 0.32's predict_on_batch passes a 1-tuple to decode_predictions, which
    # expects the images or an (images, targets) pair: decode explicitly instead.
    # One function per detector, traced once per batch size (keras-hub's NMS needs
    # a static one).
    @tf.function
    def detect(images):
      return detector.decode_predictions(detector(images, training=False), images)
    _DETECT_FUNCTIONS[detector] = detect
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
  predictions, ground_truths = predict_boxes(detector, dataset, batch_size)
  result = detection_metrics.coco_map(predictions, ground_truths, num_classes)
  result["detections_per_image"] = float(sum(len(p[1]) for p in predictions) /
                                         max(1, len(predictions)))
  return result


def detection_picture(images, predictions, ground_truths, class_names, min_score=0.3,
                      scale=4):
  """One row of images, enlarged `scale` times: true boxes in green, predictions of
  confidence >= min_score in red with class and confidence. uint8 (H, W, 3)."""
  tiles = []
  for image, (boxes, scores, labels), (true_boxes, true_labels) in zip(
      images, predictions, ground_truths):
    tile = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(tile)
    for box, label in zip(true_boxes, true_labels):
      draw.rectangle([float(v) * scale for v in box], outline=(0, 220, 0), width=2)
    for box, score, label in zip(boxes, scores, labels):
      if score >= min_score:
        draw.rectangle([float(v) * scale for v in box], outline=(255, 40, 40), width=1)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        draw.text((float(box[0]) * scale + 2, float(box[1]) * scale + 1),
                  f"{name} {score:.2f}", fill=(255, 40, 40))
    tiles.append(np.asarray(tile))
  gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
  return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)


def write_picture(detector, test, class_names, workdir, step, count=8):
  """The picture of the first `count` test images: <workdir>/detections.png and
  TensorBoard (eval/detection/test_images)."""
  sample = test.take(count)
  predictions, truths = predict_boxes(detector, sample, count)
  images = [image.numpy() for image, _ in sample]
  picture = detection_picture(images, predictions, truths, class_names)
  Image.fromarray(picture).save(workdir.join("detections.png"))
  writer = tf.summary.create_file_writer(workdir.join("eval"))
  with writer.as_default(step=step):
    tf.summary.image("detection/test_images_true_green_predicted_red",
                     picture[None].astype(np.uint8))
  writer.flush()


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def training_batches(source, batch_size, seed, start_epoch, epochs):
  """The training batches of epochs start_epoch+1 .. epochs, each epoch shuffled from
  (seed, epoch) alone: a resumed run sees what an uninterrupted one would have."""
  train = source.train.cache() if source.num_train <= 20000 else source.train
  train = train.map(lambda image, target: (as_float_images(image), target),
                    num_parallel_calls=tf.data.AUTOTUNE)
  buffer = min(source.num_train, 10000)

  # One shuffle per epoch, seeded in Python (tf.data's shuffle takes no traced seed),
  # the epochs concatenated.
  stream = None
  for epoch in range(start_epoch + 1, epochs + 1):
    batches = train.shuffle(buffer, seed=seed * 100_003 + epoch).batch(
        batch_size, drop_remainder=True)
    stream = batches if stream is None else stream.concatenate(batches)
  return stream.prefetch(tf.data.AUTOTUNE)


def _epoch_end(run, evaluate, cfg, images_per_epoch, log):
  """The callback closing each epoch: guard, log line, mAP, progress, checkpoint."""

  eval_writer = tf.summary.create_file_writer(run.workdir.join("eval"))

  class EpochEnd(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
      logs = {k: float(v) for k, v in (logs or {}).items()}
      number = epoch + 1
      if not math.isfinite(logs.get("loss", 0.0)):
        raise errors.TrainingStopped(
            f"loss is {logs.get('loss')} in epoch {number}: training stopped; the last "
            f"good checkpoint in {cfg.workdir} is kept (lower --lr)")
      run.progress.setdefault("first_epoch_loss", logs.get("loss"))
      run.progress["last_epoch_loss"] = logs.get("loss")
      line = (f"epoch {number}/{cfg.epochs}: loss {logs.get('loss', 0):.4f} (box "
              f"{logs.get('bbox_regression_loss', 0):.4f}, class "
              f"{logs.get('cls_logits_loss', 0):.4f}), "
              f"{images_per_epoch / (time.time() - self.start):.0f} img/s")
      if number % cfg.eval_every_epochs == 0 or number == cfg.epochs:
        scores, train = evaluate()
        line += (f", test mAP {100 * scores['mAP']:.2f} (AP50 {100 * scores['AP50']:.2f}, "
                 f"AP75 {100 * scores['AP75']:.2f}), train mAP {100 * train['mAP']:.2f} "
                 f"(AP50 {100 * train['AP50']:.2f})")
        with eval_writer.as_default(step=number):
          for key in ("mAP", "AP50", "AP75"):
            tf.summary.scalar(f"detection/{key}", 100 * scores[key])
            tf.summary.scalar(f"detection/train_{key}", 100 * train[key])
        eval_writer.flush()
        scores = dict(scores, train_mAP=train["mAP"], train_AP50=train["AP50"],
                      train_AP75=train["AP75"])
        run.progress["last_scores"] = scores
        run.record(number, mAP=scores["mAP"], AP50=scores["AP50"], train_mAP=train["mAP"],
                   train_AP50=train["AP50"])
      run.end_epoch(number)
      log(line)
  return EpochEnd()


def _report_anchor_coverage(detector, source, cfg, log):
  """Logs (and returns) the share of training boxes that some anchor matches at IoU
  0.5; warns below 90%: the others are never learned as objects."""

  boxes = []
  for _, target in source.train.take(COVERAGE_IMAGES):
    labels = target["labels"].numpy()
    boxes.append(target["boxes"].numpy()[labels >= 0])
  generator = detector.anchor_generator
  coverage = detector_lib.anchor_coverage(generator, cfg.data.image_size,
                                          np.concatenate(boxes))
  line = (f"anchors: levels {generator.min_level}-{generator.max_level}, size "
          f"{generator.anchor_size:g}; {100 * coverage:.1f}% of the training boxes have "
          "one with IoU >= 0.5")
  if coverage < 0.9:
    line += (" (the rest are never learned as objects: change --anchor_size or "
             "--min_level)")
  log(line)
  return coverage


def _detector_and_optimizer(encoder, metadata, num_classes, steps_per_epoch, cfg):
  detector = detector_lib.build_detector(
      encoder, metadata, num_classes, image_size=cfg.data.image_size,
      min_level=cfg.min_level, max_level=cfg.max_level, anchor_size=cfg.anchor_size,
      head_convs=cfg.head_convs)
  total = steps_per_epoch * cfg.epochs
  schedule = schedules.WarmupCosine(
      base_lr=cfg.lr, total_steps=total,
      warmup_steps=min(cfg.warmup_epochs * steps_per_epoch, total),
      warmup_start_lr=cfg.lr * 0.01, min_lr=0.0)
  optimizer = schedules.ReferenceSGD(schedule, momentum=cfg.momentum,
                                     l2_weight_decay=cfg.weight_decay,
                                     global_clipnorm=cfg.clipnorm or None)
  detector.compile(optimizer=optimizer)
  optimizer.build(detector.trainable_variables)
  return detector, optimizer


def run_detection(encoder, metadata, source, cfg, log=print):
  """Fine-tunes (or resumes) a RetinaNet on `encoder` as `cfg` (a config.DetectConfig)
  says; returns the result dict (detect.json)."""

  if cfg.deterministic:
    tf.config.experimental.enable_op_determinism()
  steps_per_epoch = source.num_train // cfg.batch_size
  if steps_per_epoch < 1:
    raise errors.ConfigError(f"--batch_size={cfg.batch_size}: larger than the "
                             f"{source.num_train} training images")
  with epochs_lib.EpochRun.open(cfg, command="corinfomax_tf.detect",
                                result_file=RESULT_FILE, log=log,
                                encoder=metadata.get("identity")) as run:
    if run.finished is not None:
      log(f"Already trained: {cfg.epochs} epochs in {cfg.workdir}")
      return run.finished
    keras.utils.set_random_seed(cfg.seed)
    detector, optimizer = _detector_and_optimizer(encoder, metadata, source.num_classes,
                                                  steps_per_epoch, cfg)
    start = run.restore(detector=detector, optimizer=optimizer)
    test = source.test.cache()
    # Training-set mAP beside the test's: a detector that cannot find the objects it
    # was trained on is undertrained or mis-built, not overfitted.
    train_sample = source.train.take(min(TRAIN_EVAL_IMAGES, source.num_train)).cache()
    log(f"{source.num_train} training / {source.num_test} test images, "
        f"{source.num_classes} classes; {steps_per_epoch} steps of {cfg.batch_size} "
        "per epoch")
    for split, lost in sorted(source.dropped_boxes.items()):
      log(f"warning: --max_boxes={cfg.data.max_boxes} leaves {lost['boxes']} {split} "
          f"boxes out ({lost['images']} images hold more, up to "
          f"{lost['most_in_one_image']}"
          + ("; the test mAP is computed without them" if split == "test" else "")
          + f"); --max_boxes={lost['most_in_one_image']} keeps every box")
    coverage = _report_anchor_coverage(detector, source, cfg, log)
    callbacks = [
        _epoch_end(run, lambda: (evaluate_map(detector, test, source.num_classes),
                                 evaluate_map(detector, train_sample, source.num_classes)),
                   cfg, steps_per_epoch * cfg.batch_size, log),
        keras.callbacks.TensorBoard(run.workdir.join("logs"), write_graph=False,
                                    update_freq="epoch")]
    if start < cfg.epochs:
      detector.fit(training_batches(source, cfg.batch_size, cfg.seed, start, cfg.epochs),
                   epochs=cfg.epochs, initial_epoch=start, steps_per_epoch=steps_per_epoch,
                   callbacks=callbacks, verbose=0, shuffle=False)
    scores = run.progress.pop("last_scores", {})
    write_picture(detector, test, list(source.class_names), run.workdir,
                  steps_per_epoch * cfg.epochs)
    return run.finish(dict(
        **scores, anchor_coverage=coverage, dropped_boxes=source.dropped_boxes,
        train_eval_images=int(
            min(TRAIN_EVAL_IMAGES, source.num_train)), init=cfg.init, batch_size=cfg.batch_size, lr=cfg.lr,
        image_size=cfg.data.image_size, num_train=source.num_train,
        num_test=source.num_test, num_classes=source.num_classes,
        class_names=list(source.class_names), seed=cfg.seed,
        parameters=int(detector.count_params()),
        **saved_model.provenance(cfg.encoder, metadata, cfg.data.dataset,
                                 metadata.get("identity"))))
