"""The pretraining model: backbone + projector + CorInfoMax loss, with `train_step`."""

import keras
import tensorflow as tf

from corinfomax_tf.method import losses
from corinfomax_tf.models import factory, pooling
from corinfomax_tf.models import projector as projector_lib
from corinfomax_tf.training import distribute, schedules

METRIC_NAMES = ("loss", "attraction", "cov")


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class CorInfoMax(keras.Model):
  """CorInfoMax self-supervised pretraining of any backbone, as a `keras.Model`.

  Two augmented views go through one backbone and projector; the loss pulls the
  views' projections together (attraction) and maximises the log-determinant of
  their running covariance (the "big-bang" term that prevents collapse). `fit` takes
  batches of both views stacked as (batch, 2, height, width, 3) (what
  `corinfomax_tf.two_views` yields), alone or with labels (used only by the online
  probe). `call(images)` returns the backbone's pooled features.

  The backbone may be any `keras.Model` with one image input: a feature map output
  is average-pooled, a token sequence gives its class token (or the token mean where
  there is none), a vector is taken as it is (`corinfomax_tf.models.pooling`).

  The training step:
    1. encodes and projects each view separately (BatchNorm statistics per view, as
       the reference's two forward passes give);
    2. gathers both projections over all replicas, so the loss and the covariance
       update see the global batch and every replica computes the same state;
    3. differentiates loss / num_replicas: the optimizer sums gradients over
       replicas and the gather's backward sums too, so this gives exactly the
       one-device gradient of the global-batch loss;
    4. reports the unscaled terms through metrics it owns (Keras' own "loss"
       tracker is not used, so the logged value is the computed one).

  Args:
    backbone: a `keras.Model` taking normalised images (a keras-hub backbone, our
      `CorInfoMaxBackbone`, or any model of yours).
    projector: the projector's widths as "2048-2048-64" (the last one is the
      dimension D of the covariance), or a layer or model of your own mapping
      pooled features to [B, D].
    loss: a `CorInfoMaxLoss`, a dict of its arguments (without `dim`), or None for
      the paper's CIFAR setting (alpha 250, forgetting factors 0.01, eps 1e-8).
    projector_bn: BatchNorm in the projector's hidden layers (a spec string only).
    l2_normalize: L2-normalise the projector's outputs (a spec string only).
    sync_batch_norm: synchronise the projector's BatchNorm across replicas.
    probe_classes: >0 adds an online linear probe on stop-gradient features.
    probe_learning_rate: the online probe's SGD learning rate.
    vector_logs: shape-[1] logs (MultiWorkerMirroredStrategy's fit needs them).

  Example:
  ```python
  import keras_hub, corinfomax_tf
  backbone = keras_hub.models.ViTBackbone(
      image_shape=(32, 32, 3), patch_size=4, num_layers=2, num_heads=2,
      hidden_dim=64, mlp_dim=128)
  model = corinfomax_tf.CorInfoMax(backbone, projector="256-256-64")
  model.compile()   # the paper's SGD, warm-up and cosine, sized at fit
  model.fit(corinfomax_tf.two_views(images, image_size=32, batch_size=64), epochs=2,
            steps_per_epoch=10)
  features = model.predict(normalised_images)
  ```
  """

  def __init__(self, backbone, projector="2048-2048-64", loss=None, *, projector_bn=False,
               l2_normalize=True, sync_batch_norm=False, probe_classes=0,
               probe_learning_rate=0.1, vector_logs=False, **kwargs):
    kwargs.setdefault("name", "corinfomax")
    super().__init__(**kwargs)
    if not isinstance(backbone, keras.Model):
      raise ValueError("`backbone` must be a keras.Model taking images. Received: "
                       f"backbone={backbone!r}")
    self.encoder = backbone
    self.pool = pooling.pooling_layer(backbone)
    self.feature_dim = pooling.feature_dim(backbone)
    self.projector = _projector(projector, self.feature_dim, projector_bn, l2_normalize,
                                sync_batch_norm)
    self.loss_layer = _loss_layer(loss, _output_dim(self.projector, self.feature_dim))
    self.projector_bn = projector_bn
    self.l2_normalize = l2_normalize
    self.sync_batch_norm = sync_batch_norm
    self.probe_classes = probe_classes
    self.probe_learning_rate = probe_learning_rate
    loss_layer = self.loss_layer
    # Online linear probe (optional): a linear head on stop-gradient pooled features
    # of view 1, trained by its own optimizer. It cannot change the encoder's
    # gradients: its input is cut from the graph and its loss is differentiated
    # with respect to the head's weights only.
    self.probe_head = None
    if probe_classes:
      self.probe_head = keras.layers.Dense(probe_classes, name="online_probe")
      self.probe_head.build((None, self.feature_dim))
      self.probe_optimizer = keras.optimizers.SGD(probe_learning_rate, momentum=0.9,
                                                  name="probe_sgd")
      self.probe_optimizer.build(self.probe_head.trainable_variables)
    # MultiWorkerMirroredStrategy's fit cannot reduce scalar logs (Keras 3.15):
    # shape-[1] values work there.
    self.vector_logs = vector_logs
    names = METRIC_NAMES + (("logdet1", "logdet2") if loss_layer.covariance == "per_branch"
                            else ("logdet",))
    names += ("grad_norm",)
    if self.probe_head is not None:
      names += ("probe_loss", "probe_top1")
    self.trackers = {name: keras.metrics.Mean(name=name) for name in names}
    # Training steps taken. Not optimizer.iterations: a float16 loss-scale
    # optimizer skips updates whose gradients overflow, but the step still counts
    # for checkpoint numbering and resuming.
    self.step_counter = keras.Variable(0, dtype="int64", trainable=False,
                                       name="step_counter",
                                       aggregation="only_first_replica")
    self._pending_schedule = None
    self._schedule = None
    self._compile_args = None
    self.built = True

  @property
  def backbone(self):
    return self.encoder

  def compile(self, optimizer="auto", *, learning_rate=0.5, momentum=0.9,
              weight_decay=1e-4, warmup_epochs=10, warmup_start_lr=3e-3, min_lr=1e-6,
              total_steps=None, warmup_steps=None, **kwargs):
    """Configures training; the optimizer is built for the pretraining variables.

    Args:
      optimizer: "auto" (the paper's: PyTorch-semantics SGD with coupled weight
        decay, a linear warm-up from `warmup_start_lr`, then a cosine to `min_lr`)
        or any Keras optimizer (the other arguments are then ignored).
      learning_rate: the base rate, for the global batch.
      momentum: SGD momentum.
      weight_decay: coupled L2 weight decay.
      warmup_epochs: warm-up length in epochs (used when `warmup_steps` is None).
      warmup_start_lr: the rate at step 0.
      min_lr: the rate at the end of the cosine.
      total_steps: the schedule's length in steps; None: sized by the first `fit`
        from its `epochs` and `steps_per_epoch` (or the dataset's length).
      warmup_steps: the warm-up's length in steps; None: `warmup_epochs` epochs,
        sized like `total_steps`.
      **kwargs: passed to `keras.Model.compile` (`jit_compile`, ...).
    """
    self._pending_schedule = None
    self._schedule = None
    auto = isinstance(optimizer, str) and optimizer == "auto"
    self._compile_args = {
        "optimizer": "auto" if auto else optimizer, "learning_rate": learning_rate,
        "momentum": momentum, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
        "warmup_start_lr": warmup_start_lr, "min_lr": min_lr, "total_steps": total_steps,
        "warmup_steps": warmup_steps, **kwargs}
    if auto:
      optimizer, schedule = schedules.reference_optimizer(
          learning_rate, total_steps or 1, warmup_steps or 0, momentum=momentum,
          weight_decay=weight_decay, warmup_start_lr=warmup_start_lr, min_lr=min_lr)
      self._schedule = schedule
      if total_steps is None:
        self._pending_schedule = (schedule, warmup_epochs, warmup_steps)
    super().compile(optimizer=optimizer, **kwargs)
    self.optimizer.build(self.pretraining_variables)

  def get_compile_config(self):
    """`compile`'s arguments, with the schedule's length once `fit` sized it, so
    that `keras.models.load_model` compiles the same training again (the optimizer's
    state, step and the loss's running estimates are restored with the weights)."""
    args = dict(getattr(self, "_compile_args", None) or {})
    if not args:
      return None
    if self._schedule is not None and self._pending_schedule is None:
      args["total_steps"] = int(self._schedule.total_steps)
      args["warmup_steps"] = int(self._schedule.warmup_steps)
    if args["optimizer"] != "auto":
      args["optimizer"] = keras.saving.serialize_keras_object(self.optimizer)
    return args

  def compile_from_config(self, config):
    """Compiles from `get_compile_config()` (what `load_model` calls)."""
    config = dict(config)
    if config.get("optimizer", "auto") != "auto":
      config["optimizer"] = keras.saving.deserialize_keras_object(config["optimizer"])
    self.compile(**config)

  def fit(self, x=None, y=None, epochs=1, steps_per_epoch=None, **kwargs):
    """`keras.Model.fit`; the first call sizes a schedule `compile` left open.

    `x` holds both views of every image, stacked as (batch, 2, H, W, 3): a
    tf.data.Dataset (what `corinfomax_tf.two_views` makes from images) or an array
    of such views. Arrays of single images are refused with one line naming
    `two_views`: the views are drawn anew every epoch, which a fixed array cannot do.
    """
    check_backend(self)
    _check_fit_input(x)
    if self._pending_schedule is not None:
      schedule, warmup_epochs, warmup_steps = self._pending_schedule
      steps = steps_per_epoch or _finite_length(x, kwargs.get("batch_size"))
      if not steps:
        raise ValueError(
            "The learning-rate schedule needs the epoch's length: pass steps_per_epoch "
            "to fit (or total_steps to compile). Received: steps_per_epoch="
            f"{steps_per_epoch!r} and a dataset of unknown or infinite length")
      schedule.total_steps = int(epochs) * int(steps)
      schedule.warmup_steps = min(schedule.total_steps, int(
          warmup_steps if warmup_steps is not None else warmup_epochs * steps))
      self._pending_schedule = None
    # The two-view pipeline shuffles (seeded, so that a resume sees the same stream).
    kwargs.setdefault("shuffle", False)
    return super().fit(x, y, epochs=epochs, steps_per_epoch=steps_per_epoch, **kwargs)

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.encoder),
            "projector": keras.saving.serialize_keras_object(self.projector),
            "loss": keras.saving.serialize_keras_object(self.loss_layer),
            "projector_bn": self.projector_bn, "l2_normalize": self.l2_normalize,
            "sync_batch_norm": self.sync_batch_norm, "probe_classes": self.probe_classes,
            "probe_learning_rate": self.probe_learning_rate,
            "vector_logs": self.vector_logs}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    for key in ("backbone", "projector", "loss"):
      config[key] = keras.saving.deserialize_keras_object(config[key])
    return cls(**config)

  @property
  def metrics(self):
    return list(self.trackers.values())

  @property
  def pretraining_variables(self):
    """The weights the CorInfoMax loss trains (the online probe has its own)."""
    return self.encoder.trainable_variables + self.projector.trainable_variables

  def _symbolic_build(self, iterator=None, data_batch=None):
    # The JAX trainer's build (the TensorFlow one's is below): everything is built
    # in __init__ and compile; a symbolic call would feed stacked views to the
    # backbone.
    if self.optimizer is not None and not self.optimizer.built:
      super()._symbolic_build(iterator=iterator, data_batch=data_batch)

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Everything is built inside the strategy scope before fit. Keras' symbolic
    # build would reduce a first (views, labels) batch across workers, which fails
    # on nested data under MultiWorkerMirroredStrategy (Keras 3.15).
    if self.optimizer is not None and not self.optimizer.built:
      super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  def features(self, images, training=False):
    """Pooled features of the backbone, [B, F]."""
    outputs = self.encoder(images, training=training)
    return outputs if self.pool is None else self.pool(outputs)

  def call(self, images, training=False):
    return self.features(images, training=training)

  def compute_loss_terms(self, x1, x2, training=True, return_features=False):
    """Forward pass of both views and the loss on the global batch."""
    h1 = self.features(x1, training=training)
    h2 = self.features(x2, training=training)
    z1 = distribute.gather(self.projector(h1, training=training))
    z2 = distribute.gather(self.projector(h2, training=training))
    terms = self.loss_layer(z1, z2, training=training)
    return (terms, h1) if return_features else terms

  def train_step(self, *args):
    if len(args) == 2:   # Keras' JAX trainer: (state, data) -> (logs, state)
      return _jax_step().train_step(self, *args)
    data, = args
    views, labels = self._unpack(data)
    x1, x2 = split_views(views)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    with tf.GradientTape() as tape:
      terms, features = self.compute_loss_terms(x1, x2, training=True,
                                                return_features=True)
      # Scale for gradients, not for logs (see the class docstring, point 3).
      loss = tf.cast(terms["loss"], tf.float32) / replicas
      if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
        loss = self.optimizer.scale_loss(loss)
    variables = self.pretraining_variables
    grads = tape.gradient(loss, variables)
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      scale = tf.cast(self.optimizer.dynamic_scale, tf.float32)
    else:
      scale = 1.0
    # Exact on one replica. With several, each replica holds only its share of the
    # gradient (the optimizer sums them); its norm times the replica count is an
    # estimate of the global norm that costs no extra all-reduce. fit() averages the
    # replicas' logs, so a non-finite gradient on any replica reaches the logs, where
    # the non-finite guard stops the run before the next checkpoint (tested).
    # Dense first: an embedding's gradient is IndexedSlices whose rows repeat (one per
    # lookup), and the norm of the rows is not the norm of their sum.
    grad_norm = tf.linalg.global_norm(
        [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
         for g in grads]) / scale * replicas
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      # An overflowing float16 step is skipped by the optimizer: log 0, not inf.
      grad_norm = tf.where(tf.math.is_finite(grad_norm), grad_norm, 0.0)
    terms = {**terms, "grad_norm": grad_norm}
    self.optimizer.apply(grads, variables)
    self.step_counter.assign_add(1)
    if self.probe_head is not None:
      terms = {**terms, **self._probe_step(tf.stop_gradient(features), labels, replicas)}
    return self._update_metrics(terms)

  def _unpack(self, data):
    """Keras' data conventions: views alone, (views, labels) or (views, labels,
    sample_weight); views stacked as (batch, 2, H, W, C). Labels feed only the
    online probe; sample weights have no meaning for the CorInfoMax loss."""
    views, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if sample_weight is not None:
      raise ValueError("CorInfoMax takes no sample weights: the loss is over the "
                       "batch's covariance. Received: sample_weight="
                       f"{sample_weight!r}")
    if labels is None and self.probe_head is not None:
      raise ValueError("The online probe needs labels: pass (views, labels). "
                       f"Received: views alone, views={views!r}")
    shape = tf.TensorShape(views.shape)
    if shape.rank is not None and (shape.rank != 5 or shape[1] not in (2, None)):
      raise ValueError("Expected both views stacked as (batch, 2, height, width, "
                       f"channels). Received: views with shape {tuple(shape)}")
    return views, labels

  def _probe_step(self, features, labels, replicas):
    head_vars = self.probe_head.trainable_variables
    with tf.GradientTape() as tape:
      logits = self.probe_head(tf.cast(features, tf.float32))
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.cast(labels, tf.int32), logits=logits))
      # Summed over replicas by the optimizer: the mean of the replicas' means.
      scaled = loss / replicas
    self.probe_optimizer.apply(tape.gradient(scaled, head_vars), head_vars)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1), tf.cast(labels, tf.int64)),
                      tf.float32)
    # Global values for the logs: every replica reports the same numbers.
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      loss = ctx.all_reduce("mean", loss)
      correct = distribute.gather(correct)
    return {"probe_loss": loss, "probe_top1": 100.0 * tf.reduce_mean(correct)}

  def test_step(self, *args):
    if len(args) == 2:   # Keras' JAX trainer
      return _jax_step().test_step(self, *args)
    data, = args
    views, _ = self._unpack(data)
    x1, x2 = split_views(views)
    terms = self.compute_loss_terms(x1, x2, training=False)
    return self._update_metrics({**terms, "grad_norm": tf.constant(0.0)})

  def _update_metrics(self, terms):
    logs = {}
    for name, tracker in self.trackers.items():
      tracker.update_state(keras.ops.cast(terms[name], "float32"))
      value = tracker.result()
      logs[name] = keras.ops.reshape(value, [1]) if self.vector_logs else value
    return logs


def _jax_step():
  from corinfomax_tf.method import jax_step   # JAX is optional: only that backend
  return jax_step


TRAINING_BACKENDS = ("tensorflow", "jax")


def check_backend(model):
  """One line where `model` cannot train on this Keras backend."""
  backend = keras.backend.backend()
  if backend not in TRAINING_BACKENDS:
    raise RuntimeError(
        f"CorInfoMax trains on Keras' TensorFlow or JAX backend; this one is "
        f"{backend!r} (KERAS_BACKEND): set KERAS_BACKEND=tensorflow or jax before "
        "importing keras")
  if backend == "jax" and model.probe_head is not None:
    raise ValueError("The online probe (probe_classes) trains on the TensorFlow backend "
                     "only; on JAX the probes run after training. Received: "
                     f"probe_classes={model.probe_classes}")
  if backend == "jax" and isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
    raise ValueError("float16 loss scaling (mixed_float16) trains on the TensorFlow "
                     "backend only; on JAX use mixed_bfloat16 or float32")


def _finite_length(dataset, batch_size=None):
  """The number of batches of a finite tf.data.Dataset, or of an array of views
  in batches of `batch_size` (Keras' default 32); None otherwise."""
  if isinstance(dataset, (tuple, list)) and dataset:
    dataset = dataset[0]
  if not isinstance(dataset, tf.data.Dataset):
    shape = getattr(dataset, "shape", None)
    if shape is None or len(shape) == 0 or shape[0] is None:
      return None
    return -(-int(shape[0]) // int(batch_size or 32))
  n = int(dataset.cardinality())
  return n if n > 0 else None


def _check_fit_input(x):
  """One line for what `fit` cannot take: arrays that are not stacked views."""
  array = x[0] if isinstance(x, (tuple, list)) and x else x
  if array is None or isinstance(array, tf.data.Dataset):
    return
  shape = getattr(array, "shape", None)
  if shape is None or not hasattr(array, "dtype"):
    return   # generators and PyDatasets: their batches are checked by the step
  shape = tuple(shape)
  if len(shape) == 5 and shape[1] == 2:
    return
  if len(shape) == 4:
    raise ValueError(
        "CorInfoMax.fit takes two augmented views of every image, stacked as (batch, 2, "
        "height, width, channels), and draws new views each epoch: make them with "
        "corinfomax_tf.two_views(tf.data.Dataset.from_tensor_slices(images), "
        f"image_size={shape[1]}, batch_size=...). Received: x with shape {shape} "
        "(single images)")
  raise ValueError("CorInfoMax.fit takes both views stacked as (batch, 2, height, width, "
                   "channels), or a tf.data.Dataset of them (corinfomax_tf.two_views). "
                   f"Received: x with shape {shape}")


def _projector(projector, feature_dim, batch_norm, l2_normalize, sync_batch_norm):
  if isinstance(projector, str):
    try:
      projector_lib.parse_projector_spec(projector)
    except ValueError:
      raise ValueError("`projector` must be positive widths joined by '-', such as "
                       f"'2048-2048-64', or a layer. Received: projector={projector!r}"
                       ) from None
    return projector_lib.Projector(input_dim=feature_dim, spec=projector,
                                   batch_norm=batch_norm, l2_normalize=l2_normalize,
                                   sync_batch_norm=sync_batch_norm, name="projector")
  if not isinstance(projector, keras.layers.Layer):
    raise ValueError("`projector` must be a spec such as '2048-2048-64' or a Keras layer. "
                     f"Received: projector={projector!r}")
  return projector


def _output_dim(projector, feature_dim):
  dim = getattr(projector, "output_dim", None)
  if dim is None:
    dim = projector.compute_output_shape((None, feature_dim))[-1]
  return int(dim)


def _loss_layer(loss, dim):
  if isinstance(loss, losses.CorInfoMaxLoss):
    if loss.dim != dim:
      raise ValueError(f"The loss's dim must be the projector's output dimension {dim}. "
                       f"Received: loss.dim={loss.dim}")
    return loss
  if loss is not None and not isinstance(loss, dict):
    raise ValueError("`loss` must be a CorInfoMaxLoss, a dict of its arguments or None. "
                     f"Received: loss={loss!r}")
  args = {"alpha": 250.0, **(loss or {})}
  args.pop("dim", None)
  return losses.CorInfoMaxLoss(dim=dim, name="corinfomax_loss", **args)


# The name earlier releases gave the class.
CorInfoMaxModel = CorInfoMax


def split_views(data):
  """(B, 2, H, W, C) stacked views -> (view1, view2)."""
  return data[:, 0], data[:, 1]


def build_pretraining_model(model_cfg, loss_cfg, sync_bn=False, vector_logs=False,
                            probe_classes=0, backbone=None, image_size=None):
  """Backbone (built from `model_cfg` unless given), projector and loss layer from
  config objects (call inside a strategy's scope)."""
  if backbone is None:
    backbone = factory.build(model_cfg, image_size=image_size, sync_batch_norm=sync_bn)
  loss = {k: getattr(loss_cfg, k) for k in ("alpha", "cov_weight", "la_R", "la_mu",
                                            "eps", "R_ini", "covariance")}
  return CorInfoMax(backbone, projector=model_cfg.projector, loss=loss,
                    projector_bn=model_cfg.projector_bn,
                    l2_normalize=model_cfg.l2_normalize, sync_batch_norm=sync_bn,
                    vector_logs=vector_logs, probe_classes=probe_classes,
                    name="corinfomax")
