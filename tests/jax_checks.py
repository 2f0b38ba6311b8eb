"""The JAX side of tests/test_jax_backend.py: one process on Keras' JAX backend.

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python -m tests.jax_checks <dir>

reads what the TensorFlow side wrote in <dir> (inputs.npz, <kind>.weights.h5) and
writes the JAX results there (jax.npz, jax_<kind>_steps.weights.h5, an exported
encoder under jax_encoder/). The model builders are shared by both sides, so both
build the same architecture; the weights travel as Keras weight files.
"""

import os
import sys

import numpy as np

LOSS_ARGS = dict(alpha=500.0, cov_weight=1.0, la_R=0.01, la_mu=0.01, eps=1e-8)
STEPS = 3
BATCH = 8
LOGGED = ("loss", "attraction", "cov", "grad_norm")
KINDS = ("resnet", "vit")


def build(kind):
  """The CorInfoMax model of each kind, compiled with the paper's SGD (a short warm-up,
  so that the few steps move the weights)."""
  import keras_hub

  import corinfomax_tf
  if kind == "resnet":
    backbone = corinfomax_tf.CorInfoMaxBackbone(depth=18, stem="cifar", width=4,
                                                image_size=16)
  else:
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
        mlp_dim=32)
  model = corinfomax_tf.CorInfoMax(backbone, projector="32-16",
                                   loss={"alpha": 500.0, "la_R": 0.01, "la_mu": 0.01})
  model.compile(learning_rate=0.5, total_steps=2 * STEPS, warmup_steps=2)
  return model


def train(model, views):
  """One epoch of `fit` over the views in order, BATCH at a time: the epoch's logs."""
  history = model.fit(views, epochs=1, batch_size=BATCH, verbose=0, shuffle=False)
  return np.asarray([history.history[name][-1] for name in LOGGED])


def _loss_terms(inputs):
  """The loss terms and their gradients w.r.t. z1, z2 (float64), both covariances."""
  import jax
  import jax.numpy as jnp

  from corinfomax_tf.method import losses_jax
  losses_jax.enable_float64()
  out = {}
  for covariance in ("per_branch", "shared"):
    state = ({"mu1": inputs["mu1"], "R1": inputs["R1"], "mu2": inputs["mu2"],
              "R2": inputs["R2"]} if covariance == "per_branch"
             else {"mu": inputs["mu1"], "R": inputs["R1"]})
    state = {k: jnp.asarray(v) for k, v in state.items()}

    def loss(z1, z2):
      terms, new = losses_jax.corinfomax_terms(z1, z2, state, covariance=covariance,
                                               **LOSS_ARGS)
      return terms["loss"], (terms, new)

    (_, (terms, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(inputs["z1"]), jnp.asarray(inputs["z2"]))
    for name, value in {**terms, **new}.items():
      out[f"terms_{covariance}_{name}"] = np.asarray(value)
    out[f"terms_{covariance}_dz1"], out[f"terms_{covariance}_dz2"] = map(np.asarray, grads)
  return out


def _saved_and_reloaded(directory, model, views):
  """`model.save` and `load_model`, then training on: the reloaded model's logs and
  those of the model that was not saved, over the same batches."""
  import keras
  path = os.path.join(directory, "jax_resnet.keras")
  model.save(path)
  reloaded = keras.models.load_model(path)
  return {"resnet_reloaded_logs": train(reloaded, views),
          "resnet_reloaded_step": np.asarray(reloaded.step_counter.value),
          "resnet_continued_logs": train(model, views)}


def _two_devices(directory, views):
  """The ResNet steps again under keras.distribution.DataParallel over 2 CPU devices."""
  import jax
  import keras
  devices = jax.devices("cpu")
  assert len(devices) == 2, devices
  keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
  model = build("resnet")
  model.load_weights(os.path.join(directory, "resnet.weights.h5"))
  losses = train(model, views)
  keras.distribution.set_distribution(None)
  model.save_weights(os.path.join(directory, "jax_resnet_2dev.weights.h5"))
  return {"resnet_2dev_logs": losses,
          "resnet_2dev_sharded": np.asarray(len(
              model.encoder.trainable_variables[0].value.sharding.device_set))}


def main(directory):
  import jax
  import keras
  assert keras.backend.backend() == "jax", keras.backend.backend()
  inputs = dict(np.load(os.path.join(directory, "inputs.npz")))
  out = _loss_terms(inputs)
  for kind in KINDS:
    with jax.default_device(jax.devices("cpu")[0]):
      model = build(kind)
      assert [v.path for v in model.trainable_variables] == [
          v.path for v in model.pretraining_variables]
      model.load_weights(os.path.join(directory, f"{kind}.weights.h5"))
      out[f"{kind}_logs"] = train(model, inputs["views"])
      out[f"{kind}_step_counter"] = np.asarray(model.step_counter.value)
      out[f"{kind}_R1_dtype"] = np.asarray(str(model.loss_layer.R1.value.dtype))
      # A JAX workdir's checkpoint holds the encoder's variables by position.
      out[f"{kind}_encoder_variables"] = np.asarray(
          [f"{v.path} {tuple(v.shape)}" for v in model.encoder.variables])
      model.save_weights(os.path.join(directory, f"jax_{kind}_steps.weights.h5"))
    if kind == "resnet":
      images = inputs["views"][:BATCH, 0]
      out["resnet_features"] = np.asarray(model.encoder(images, training=False))
      # Keras' own export on this backend (jax2tf): what TensorFlow users load.
      model.encoder.export(os.path.join(directory, "jax_encoder"), format="tf_saved_model",
                           verbose=False)
      model.encoder.save(os.path.join(directory, "jax_encoder.keras"))
      out.update(_saved_and_reloaded(directory, model, inputs["views"]))
  out.update(_two_devices(directory, inputs["views"]))
  np.savez(os.path.join(directory, "jax.npz"), **out)


if __name__ == "__main__":
  main(sys.argv[1])
