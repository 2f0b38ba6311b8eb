"""BatchNormalization whose training-mode pass is TensorFlow's fused kernel.

Keras 3's BatchNormalization computes, on the TensorFlow backend, the batch moments and
the normalisation as separate ops (`tf.nn.moments`, `tf.nn.batch_normalization`): in
the training step of a CIFAR ResNet-18 on a 2-core CPU their reductions and
element-wise passes, forward and backward, are about a fifth of the op time
(docs/benchmarks.md, "Where the step's time goes"). `FusedBatchNormalization` runs the
same training-mode computation as one `FusedBatchNormV3` op (oneDNN's batch norm on
the CPU, cuDNN's on a GPU) and its gradient as one op, which the PyTorch step of the
authors does as well. The statistics it keeps are Keras': the moving variance blends
the biased batch variance, as the unfused layer's does.

Not bitwise the unfused layer: the kernel sums in another order (outputs equal to
about 1e-6 relative in float32), so a step with it is not the step the fidelity tests
compare with the authors' to 1e-12. That is why it is opt-in (`--fused_batch_norm`,
`CorInfoMaxBackbone(fused_batch_norm=True)`). Where the kernel does not apply it is the
Keras layer, bit for bit: inference mode, float64 inputs (the fused op has no float64
kernel), synchronised statistics, masks, renormalisation, an axis other than the
last of an image batch, and Keras backends other than TensorFlow.
"""

import keras
import tensorflow as tf

_FUSED_DTYPES = ("float16", "bfloat16", "float32")


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` with a fused training-mode pass on TensorFlow.

  It takes the same arguments, keeps the same weights (checkpoints of either layer
  restore into the other) and serialises the same settings. The fused op runs in
  training mode for a trainable layer on a float16/bfloat16/float32 image batch
  normalised over its last axis; everything else is the Keras layer's own pass.

  Args:
    axis: the axis normalised over (fused: the last of a 4-D batch).
    momentum: the moving statistics' momentum (0.9 for PyTorch's 0.1).
    epsilon: added to the variance.
    center: learn an offset (beta).
    scale: learn a scale (gamma).
    beta_initializer: initializer of beta.
    gamma_initializer: initializer of gamma.
    moving_mean_initializer: initializer of the moving mean.
    moving_variance_initializer: initializer of the moving variance.
    beta_regularizer: regularizer of beta.
    gamma_regularizer: regularizer of gamma.
    beta_constraint: constraint on beta.
    gamma_constraint: constraint on gamma.
    renorm: batch renormalisation (never fused).
    renorm_clipping: renormalisation's clipping of r and d.
    renorm_momentum: renormalisation's momentum.
    synchronized: statistics across replicas (never fused).
    **kwargs: those of `keras.layers.Layer` (name, dtype, ...).

  Example:

  ```python
  layer = corinfomax_tf.FusedBatchNormalization(momentum=0.9, epsilon=1e-5)
  y = layer(images, training=True)   # one FusedBatchNormV3 op
  ```
  """

  def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
               beta_initializer="zeros", gamma_initializer="ones",
               moving_mean_initializer="zeros", moving_variance_initializer="ones",
               beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
               gamma_constraint=None, renorm=False, renorm_clipping=None,
               renorm_momentum=0.99, synchronized=False, **kwargs):
    super().__init__(
        axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale,
        beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
        moving_mean_initializer=moving_mean_initializer,
        moving_variance_initializer=moving_variance_initializer,
        beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
        beta_constraint=beta_constraint, gamma_constraint=gamma_constraint,
        renorm=renorm, renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
        synchronized=synchronized, **kwargs)

  def _fuses(self, inputs, training, mask):
    return (bool(training) and self.trainable and mask is None and not self.renorm
            and not self.synchronized and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4 and self.axis % 4 == 3
            and keras.backend.standardize_dtype(inputs.dtype) in _FUSED_DTYPES)

  def call(self, inputs, training=None, mask=None):
    if not self._fuses(inputs, training, mask):
      return super().call(inputs, training=training, mask=mask)
    x = tf.cast(inputs, tf.float32)   # as the Keras layer: statistics in float32
    channels = x.shape[-1]
    gamma = (tf.cast(self.gamma.value, tf.float32) if self.scale
             else tf.ones([channels], tf.float32))
    beta = (tf.cast(self.beta.value, tf.float32) if self.center
            else tf.zeros([channels], tf.float32))
    y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)[:3]
    # The kernel returns the unbiased variance (n / (n - 1)); Keras blends the biased.
    n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
    variance = unbiased * ((n - 1.0) / n)
    moving_mean = tf.cast(self.moving_mean.value, tf.float32)
    moving_variance = tf.cast(self.moving_variance.value, tf.float32)
    self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(
        moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return tf.cast(y, self.compute_dtype)
