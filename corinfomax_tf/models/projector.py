"""The projector head, built from a spec string such as "2048-2048-64".

Hidden layers are Dense -> (BatchNorm, the ImageNet-1K setup) -> ReLU; the last layer
is a Dense without bias, as in the authors' code. Its output is optionally
L2-normalised per sample: the reference normalises before the loss.
"""

import keras
from keras import ops

from corinfomax_tf.models.specs import parse_projector_spec  # noqa: F401 (re-exported)


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class L2Normalize(keras.layers.Layer):
  """Row-wise L2 normalisation, computed in float32 for mixed precision safety."""

  def __init__(self, epsilon=1e-12, **kwargs):
    super().__init__(**kwargs)
    self.epsilon = epsilon

  def call(self, x):
    x = ops.cast(x, "float32")
    norm = ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True),
                                self.epsilon**2))
    return x / norm

  def compute_output_spec(self, x):
    return keras.KerasTensor(x.shape, dtype="float32")

  def get_config(self):
    return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class Projector(keras.Model):
  """MLP projector.

  Args:
    input_dim: width of the encoder's pooled features.
    spec: layer widths, e.g. "2048-2048-64"; the last is the loss dimension D.
    batch_norm: BatchNorm after each hidden Dense.
    l2_normalize: L2-normalise the output rows.
    sync_batch_norm: synchronise BatchNorm statistics across replicas.

  Returns (when called):
    [B, D] projections (D the last width of `spec`), L2-normalised by default.

  Example:

  ```python
  projector = corinfomax_tf.Projector(input_dim=512, spec="2048-2048-64")
  z = projector(features)   # [B, 64]
  ```
  """

  def __init__(self, input_dim, spec="2048-2048-64", batch_norm=False,
               l2_normalize=True, sync_batch_norm=False, **kwargs):
    widths = parse_projector_spec(spec)
    if not isinstance(input_dim, int) or input_dim < 1:
      raise ValueError("input_dim must be a positive integer. "
                       f"Received: input_dim={input_dim!r}")
    # === Functional model ===
    inputs = keras.Input(shape=(input_dim,), name="features")
    x = inputs
    for i, width in enumerate(widths[:-1]):
      x = keras.layers.Dense(width, name=f"dense{i + 1}")(x)
      if batch_norm:
        x = keras.layers.BatchNormalization(
            momentum=0.9, epsilon=1e-5, synchronized=sync_batch_norm,
            name=f"bn{i + 1}")(x)
      x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
    x = keras.layers.Dense(widths[-1], use_bias=False, name=f"dense{len(widths)}")(x)
    if l2_normalize:
      x = L2Normalize(name="l2_normalize")(x)
    super().__init__(inputs=inputs, outputs=x, **kwargs)
    # === Config ===
    self.input_dim = input_dim
    self.spec = spec
    self.batch_norm = batch_norm
    self.l2_normalize = l2_normalize
    self.sync_batch_norm = sync_batch_norm
    self.output_dim = widths[-1]

  def get_config(self):
    return {"input_dim": self.input_dim, "spec": self.spec,
            "batch_norm": self.batch_norm, "l2_normalize": self.l2_normalize,
            "sync_batch_norm": self.sync_batch_norm, "name": self.name,
            "trainable": self.trainable}

  @classmethod
  def from_config(cls, config):
    return cls(**config)
