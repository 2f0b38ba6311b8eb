"""Linear evaluation of a frozen encoder, the paper's protocol, resumable exactly.

A linear classifier is trained on the encoder's pooled features: 100 epochs, batch
256, SGD momentum 0.9, no weight decay, cosine 0.2 -> 2e-3 stepped once per epoch
as the reference steps it (ImageNet-1K: lr 25
divided by 10 every 20 epochs, `schedule="step"`). Training images get the
reference's evaluation-time augmentation (random resized crop + flip); test images
are resized and centre-cropped. With `augment=False, precompute_features=True` the
features of the un-augmented training images are computed once (fast; not the
paper's protocol, and the result says so).

Every epoch's data order and augmentation are a function of (seed, epoch) alone and a
checkpoint (classifier, optimizer, epoch) is written after every epoch, so a killed
run, rerun, ends where an uninterrupted one does.
"""
import keras
import numpy as np
import tensorflow as tf

from corinfomax_tf.data import augment
from corinfomax_tf.evaluation import probes
from corinfomax_tf.export import saved_model
from corinfomax_tf.training import epochs as epochs_lib
from corinfomax_tf.training import schedules

RESULT_FILE = "linear_eval.json"


def _epoch_seed(seed, epoch):
  return seed * 100_003 + epoch


def augmented_images(examples, num_train, image_size, batch_size, crop_min_scale, seed,
                     epoch):
  """One epoch of random-resized-crop + flip training images, from (seed, epoch)."""

  ds = examples.shuffle(min(10000, num_train), seed=_epoch_seed(seed, epoch))
  seeds = tf.data.Dataset.random(seed=_epoch_seed(seed, epoch))

  def prep(example, element_seed):
    image, label = example
    return augment.crop_and_flip(image, image_size, crop_min_scale, 0.5, element_seed,
                                 salt=1), label
  ds = tf.data.Dataset.zip((ds, seeds)).map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _training_stream(encoder, source, cfg):
  """(epoch -> dataset of (images or features, labels), whether it holds features)."""

  size, batch = cfg.data.image_size, cfg.batch_size
  if cfg.augment:
    examples = source.train.cache() if source.in_memory else source.train
    return (lambda epoch: augmented_images(examples, source.num_train, size, batch,
                                           cfg.crop_min_scale, cfg.seed, epoch)), False
  if cfg.precompute_features:
    train_x, train_y = probes.extract_features(encoder, probes.eval_images(source.train,
                                                                           size))
    probes.check_labels(train_y, source.num_classes, "train_split")
    features = tf.data.Dataset.from_tensor_slices((train_x, train_y))
    return (lambda epoch: features.shuffle(len(train_y), seed=_epoch_seed(cfg.seed, epoch))
            .batch(batch)), True
  return (lambda epoch: probes.eval_images(
      source.train.shuffle(min(10000, source.num_train), seed=_epoch_seed(cfg.seed, epoch)),
      size, batch)), False


def _schedule(cfg, steps_per_epoch):
  if cfg.schedule == "cosine":
    # Stepped once per epoch, as the reference steps its CosineAnnealingLR.
    return schedules.WarmupCosine(base_lr=cfg.lr, total_steps=cfg.epochs, warmup_steps=0,
                                  min_lr=cfg.min_lr, steps_per_update=steps_per_epoch)
  return schedules.step_schedule(cfg.lr, range(cfg.step_epochs, cfg.epochs, cfg.step_epochs),
                                 0.1, steps_per_epoch)


def _train_step(head, optimizer):

  @tf.function(reduce_retracing=True)
  def train_step(features, labels):
    with tf.GradientTape() as tape:
      logits = head(features)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.cast(labels, tf.int32), logits=logits))
    optimizer.apply(tape.gradient(loss, head.trainable_variables),
                    head.trainable_variables)
    return loss, tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), labels), tf.int32))
  return train_step


def linear_head(num_classes, feature_dim):
  """The reference's classifier: one torch.nn.Linear, initialised as PyTorch does
  (kernel and bias uniform in +-1/sqrt(feature_dim); Keras' Dense would start from
  Glorot-uniform weights and a zero bias)."""
  bound = 1.0 / feature_dim ** 0.5
  head = keras.layers.Dense(
      num_classes, name="linear",
      kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
      bias_initializer=keras.initializers.RandomUniform(-bound, bound))
  head.build((None, feature_dim))
  return head


def protocol_of(cfg):
  if cfg.augment:
    return "paper: frozen encoder, augmented training images"
  if cfg.precompute_features:
    return "precomputed features of un-augmented training images (not the paper's protocol)"
  return "un-augmented training images"


def run_linear_eval(encoder, source, cfg, log=print):
  """Trains (or resumes) the linear classifier of `cfg` (a config.LinearEvalConfig);
  returns the result dict (top1/top5 in percent), also written to linear_eval.json."""

  if cfg.deterministic:
    tf.config.experimental.enable_op_determinism()
  with epochs_lib.EpochRun.open(cfg, command="corinfomax_tf.linear_eval",
                                result_file=RESULT_FILE, flag="--workdir",
                                log=log, encoder=encoder.identity) as run:
    if run.finished is not None:
      log(f"Already evaluated: {cfg.epochs} epochs in {cfg.workdir}")
      return run.finished
    keras.utils.set_random_seed(cfg.seed)
    num_classes = source.num_classes
    test_x, test_y = probes.extract_features(
        encoder, probes.eval_images(source.test, cfg.data.image_size))
    probes.check_labels(test_y, num_classes, "test_split")
    train_stream, holds_features = _training_stream(encoder, source, cfg)
    steps_per_epoch = -(-source.num_train // cfg.batch_size)
    lr_fn = _schedule(cfg, steps_per_epoch)
    head = linear_head(num_classes, int(test_x.shape[1]))
    optimizer = schedules.ReferenceSGD(lr_fn, momentum=cfg.momentum,
                                       l2_weight_decay=cfg.weight_decay)
    optimizer.build(head.trainable_variables)
    start = run.restore(head=head, optimizer=optimizer)
    train_step = _train_step(head, optimizer)
    featurize = (lambda x: x) if holds_features else encoder
    writers = (tf.summary.create_file_writer(run.workdir.join("train")),
               tf.summary.create_file_writer(run.workdir.join("eval")))
    result = run.last_record()
    for epoch in range(start + 1, cfg.epochs + 1):
      losses, correct, seen = [], 0, 0
      for images, labels in train_stream(epoch):
        labels = tf.cast(labels, tf.int64)
        loss, hits = train_step(tf.stop_gradient(featurize(images)), labels)
        losses.append(float(loss))
        correct += int(hits)
        seen += int(labels.shape[0])
      train_top1 = 100.0 * correct / max(seen, 1)
      if epoch % cfg.eval_every_epochs == 0 or epoch == cfg.epochs:
        result = probes.topk_accuracy(head(tf.constant(test_x)).numpy(), test_y)
        run.record(epoch, **result)
        log(f"epoch {epoch}/{cfg.epochs}: loss {np.mean(losses):.4f}, train top-1 "
            f"{train_top1:.2f}%, test top-1 {result['top1']:.2f}%, top-5 "
            f"{result['top5']:.2f}%")
        with writers[1].as_default(step=epoch):
          for k, v in result.items():
            tf.summary.scalar(f"linear_eval/{k}", v)
      with writers[0].as_default(step=epoch):
        tf.summary.scalar("linear_eval/loss", float(np.mean(losses)))
        tf.summary.scalar("linear_eval/train_top1", train_top1)
        tf.summary.scalar("linear_eval/learning_rate", float(lr_fn(optimizer.iterations - 1)))
      run.end_epoch(epoch)
    for w in writers:
      w.flush()
    return run.finish({
        **result, "batch_size": cfg.batch_size, "lr": cfg.lr, "schedule": cfg.schedule,
        "protocol": protocol_of(cfg), "num_train": source.num_train,
        "num_test": source.num_test, "num_classes": num_classes,
        **saved_model.provenance(cfg.encoder, encoder.metadata, cfg.data.dataset,
                                 encoder.identity)})
