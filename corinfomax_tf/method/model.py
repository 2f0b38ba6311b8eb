"""The pretraining model: encoder + projector + CorInfoMax loss, with `train_step`."""

import keras
import tensorflow as tf

from corinfomax_tf.training import distribute
from corinfomax_tf.method import losses
from corinfomax_tf.models import projector as projector_lib
from corinfomax_tf.models import factory

METRIC_NAMES = ("loss", "attraction", "cov")


class CorInfoMaxModel(keras.Model):
  """Two views through one encoder and projector, then the CorInfoMax loss.

  `call(images)` returns the encoder's pooled features (what is exported). The
  training step:
    1. encodes and projects each view separately (BatchNorm statistics per view, as
       the reference's two forward passes give);
    2. gathers both projections over all replicas, so the loss and the covariance
       update see the global batch and every replica computes the same state;
    3. differentiates loss / num_replicas: the optimizer sums gradients over
       replicas and the gather's backward sums too, so this gives exactly the
       one-device gradient of the global-batch loss;
    4. reports the unscaled terms through metrics it owns (Keras' own "loss"
       tracker is not used, so the logged value is the computed one).
  """

  def __init__(self, encoder, projector, loss_layer, vector_logs=False,
               probe_classes=0, probe_learning_rate=0.1, **kwargs):
    super().__init__(**kwargs)
    self.encoder = encoder
    # The encoder ends with its last feature map (a keras-hub backbone): pooled here.
    self.pool = keras.layers.GlobalAveragePooling2D(name="avg_pool")
    self.projector = projector
    self.loss_layer = loss_layer
    # Online linear probe (optional): a linear head on stop-gradient pooled features
    # of view 1, trained by its own optimizer. It cannot change the encoder's
    # gradients: its input is cut from the graph and its loss is differentiated
    # with respect to the head's weights only.
    self.probe_head = None
    if probe_classes:
      self.probe_head = keras.layers.Dense(probe_classes, name="online_probe")
      self.probe_head.build((None, encoder.feature_dim))
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
    self.built = True

  @property
  def metrics(self):
    return list(self.trackers.values())

  @property
  def pretraining_variables(self):
    """The weights the CorInfoMax loss trains (the online probe has its own)."""
    return self.encoder.trainable_variables + self.projector.trainable_variables

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Everything is built inside the strategy scope before fit. Keras' symbolic
    # build would reduce a first (views, labels) batch across workers, which fails
    # on nested data under MultiWorkerMirroredStrategy (Keras 3.15).
    if self.optimizer is not None and not self.optimizer.built:
      super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  def features(self, images, training=False):
    """Pooled features of the encoder."""
    return self.pool(self.encoder(images, training=training))

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

  def train_step(self, data):
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
    grad_norm = tf.linalg.global_norm(grads) / scale * replicas
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
      raise ValueError("CorInfoMaxModel takes no sample weights: the loss is over the "
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

  def test_step(self, data):
    views, _ = self._unpack(data)
    x1, x2 = split_views(views)
    terms = self.compute_loss_terms(x1, x2, training=False)
    return self._update_metrics({**terms, "grad_norm": tf.constant(0.0)})

  def _update_metrics(self, terms):
    logs = {}
    for name, tracker in self.trackers.items():
      tracker.update_state(tf.cast(terms[name], tf.float32))
      value = tracker.result()
      logs[name] = tf.reshape(value, [1]) if self.vector_logs else value
    return logs


def split_views(data):
  """(B, 2, H, W, C) stacked views -> (view1, view2)."""
  return data[:, 0], data[:, 1]


def build_pretraining_model(model_cfg, loss_cfg, sync_bn=False, vector_logs=False,
                            probe_classes=0):
  """Encoder, projector and loss layer from config objects (call inside a scope)."""
  encoder = factory.encoder(model_cfg.depth, model_cfg.stem, model_cfg.width,
                            sync_batch_norm=sync_bn)
  projector = projector_lib.Projector(
      input_dim=encoder.feature_dim, spec=model_cfg.projector,
      batch_norm=model_cfg.projector_bn, l2_normalize=model_cfg.l2_normalize,
      sync_batch_norm=sync_bn, name="projector")
  loss_layer = losses.CorInfoMaxLoss(
      dim=projector.output_dim, alpha=loss_cfg.alpha, cov_weight=loss_cfg.cov_weight,
      la_R=loss_cfg.la_R, la_mu=loss_cfg.la_mu, eps=loss_cfg.eps, R_ini=loss_cfg.R_ini,
      covariance=loss_cfg.covariance, name="corinfomax_loss")
  model = CorInfoMaxModel(encoder, projector, loss_layer, vector_logs=vector_logs,
                          probe_classes=probe_classes, name="corinfomax")
  return model
