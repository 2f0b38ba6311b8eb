"""The pretraining model: encoder + projector + CorInfoMax loss, with `train_step`."""

import keras
import tensorflow as tf

from corinfomax_tf import distribute
from corinfomax_tf import losses
from corinfomax_tf.models import projector as projector_lib
from corinfomax_tf.models import resnet

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

  def __init__(self, encoder, projector, loss_layer, vector_logs=False, **kwargs):
    super().__init__(**kwargs)
    self.encoder = encoder
    self.projector = projector
    self.loss_layer = loss_layer
    # MultiWorkerMirroredStrategy's fit cannot reduce scalar logs (Keras 3.15):
    # shape-[1] values work there.
    self.vector_logs = vector_logs
    names = METRIC_NAMES + (("logdet1", "logdet2") if loss_layer.covariance == "per_branch"
                            else ("logdet",))
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

  def call(self, images, training=False):
    return self.encoder(images, training=training)

  def project(self, images, training):
    return self.projector(self.encoder(images, training=training), training=training)

  def compute_loss_terms(self, x1, x2, training=True):
    """Forward pass of both views and the loss on the global batch."""
    z1 = distribute.gather(self.project(x1, training))
    z2 = distribute.gather(self.project(x2, training))
    return self.loss_layer(z1, z2, training=training)

  def train_step(self, data):
    x1, x2 = split_views(data)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    with tf.GradientTape() as tape:
      terms = self.compute_loss_terms(x1, x2, training=True)
      # Scale for gradients, not for logs (see the class docstring, point 3).
      loss = tf.cast(terms["loss"], tf.float32) / replicas
      if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
        loss = self.optimizer.scale_loss(loss)
    variables = self.trainable_variables
    grads = tape.gradient(loss, variables)
    self.optimizer.apply(grads, variables)
    self.step_counter.assign_add(1)
    return self._update_metrics(terms)

  def test_step(self, data):
    x1, x2 = split_views(data)
    return self._update_metrics(self.compute_loss_terms(x1, x2, training=False))

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


def build_pretraining_model(model_cfg, loss_cfg, sync_bn=False, vector_logs=False):
  """Encoder, projector and loss layer from config objects (call inside a scope)."""
  encoder = resnet.ResNetEncoder(depth=model_cfg.depth, stem=model_cfg.stem,
                                 width=model_cfg.width, image_size=None,
                                 sync_batch_norm=sync_bn, name="encoder")
  projector = projector_lib.Projector(
      input_dim=encoder.feature_dim, spec=model_cfg.projector,
      batch_norm=model_cfg.projector_bn, l2_normalize=model_cfg.l2_normalize,
      sync_batch_norm=sync_bn, name="projector")
  loss_layer = losses.CorInfoMaxLoss(
      dim=projector.output_dim, alpha=loss_cfg.alpha, cov_weight=loss_cfg.cov_weight,
      la_R=loss_cfg.la_R, la_mu=loss_cfg.la_mu, eps=loss_cfg.eps, R_ini=loss_cfg.R_ini,
      covariance=loss_cfg.covariance, name="corinfomax_loss")
  model = CorInfoMaxModel(encoder, projector, loss_layer, vector_logs=vector_logs,
                          name="corinfomax")
  return model
