"""CorInfoMax on Keras' JAX backend against the TensorFlow backend, from the same
weights and batches.

One JAX process (tests/jax_checks.py, 2 logical CPU devices) computes everything the
tests below compare; this TensorFlow process writes its inputs and computes the same
things here. Tolerances: the loss terms in float64 to 1e-12 (the same operations in
the same order); the networks in float32, whose convolutions and matmuls sum in
different orders on the two backends, to a relative 1e-4 of each tensor's largest
entry after 3 steps (measured: about 1e-6 to 1e-5).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf.method import losses
from tests import helpers
from tests import jax_checks

pytestmark = pytest.mark.slow


def _inputs(rng):
  n, d = 16, 8
  z1 = rng.normal(size=(n, d))
  z2 = z1 + 0.3 * rng.normal(size=(n, d))
  a1, a2 = rng.normal(size=(2, d, d))
  views = rng.uniform(size=(jax_checks.STEPS * jax_checks.BATCH, 2, 16, 16, 3))
  return {"z1": z1, "z2": z2, "mu1": rng.normal(size=d), "mu2": rng.normal(size=d),
          "R1": a1 @ a1.T / d + np.eye(d), "R2": a2 @ a2.T / d + np.eye(d),
          "views": views.astype(np.float32)}


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
  """(directory, inputs, JAX results): the JAX process, run once for the whole test run
  (every pytest-xdist worker shares it)."""

  def make(directory):
    import keras
    np.savez(os.path.join(directory, "inputs.npz"), **_inputs(np.random.default_rng(0)))
    for kind in jax_checks.KINDS:
      keras.utils.set_random_seed(0)
      jax_checks.build(kind).save_weights(os.path.join(directory, f"{kind}.weights.h5"))
    env = dict(helpers.ENV, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-m", "tests.jax_checks", directory], env=env,
                          cwd=helpers.ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return directory

  directory = helpers.shared_once(tmp_path_factory, "jax_run", make)
  with np.load(os.path.join(directory, "inputs.npz")) as inputs, \
       np.load(os.path.join(directory, "jax.npz")) as jax_out:
    return directory, dict(inputs), dict(jax_out)


def _relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def _trained_tf(directory, inputs, kind):
  model = jax_checks.build(kind)
  model.load_weights(os.path.join(directory, f"{kind}.weights.h5"))
  return model, jax_checks.train(model, inputs["views"])


def _assert_same_weights(model, other, tolerance):
  """Each weight within `tolerance` of its largest entry, or 1e-6 absolute: a weight
  whose gradient is zero in exact arithmetic (attention's key bias) is rounding noise
  of about 1e-8 on both backends."""
  for mine, theirs in zip(model.weights, other.weights):
    assert mine.path == theirs.path
    a, b = mine.numpy().astype(np.float64), theirs.numpy().astype(np.float64)
    assert np.max(np.abs(a - b)) <= tolerance * np.max(np.abs(a)) + 1e-6, mine.path


@pytest.mark.parametrize("covariance", ["per_branch", "shared"])
def test_loss_terms_and_gradients_equal_tensorflows_in_float64(jax_run, covariance):
  _, inputs, jax_out = jax_run
  z1, z2 = tf.constant(inputs["z1"]), tf.constant(inputs["z2"])
  state = ({"mu1": inputs["mu1"], "R1": inputs["R1"], "mu2": inputs["mu2"],
            "R2": inputs["R2"]} if covariance == "per_branch"
           else {"mu": inputs["mu1"], "R": inputs["R1"]})
  with tf.GradientTape() as tape:
    tape.watch([z1, z2])
    terms, new = losses.corinfomax_terms(z1, z2, {k: tf.constant(v) for k, v in
                                                  state.items()},
                                         covariance=covariance, **jax_checks.LOSS_ARGS)
  dz1, dz2 = tape.gradient(terms["loss"], [z1, z2])
  ours = {**terms, **new, "dz1": dz1, "dz2": dz2}
  prefix = f"terms_{covariance}_"
  assert set(ours) == {k[len(prefix):] for k in jax_out if k.startswith(prefix)}
  for name, value in ours.items():
    theirs = jax_out[f"terms_{covariance}_{name}"]
    assert theirs.dtype == np.float64, name
    np.testing.assert_allclose(theirs, value.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("kind", jax_checks.KINDS)
def test_training_steps_equal_tensorflows(jax_run, kind):
  import keras
  directory, inputs, jax_out = jax_run
  keras.utils.set_random_seed(0)
  model, logs = _trained_tf(directory, inputs, kind)
  np.testing.assert_allclose(jax_out[f"{kind}_logs"], logs, rtol=1e-4)
  assert int(jax_out[f"{kind}_step_counter"]) == jax_checks.STEPS
  assert str(jax_out[f"{kind}_R1_dtype"]) == "float64"   # JAX's x64 mode kept it
  on_jax = jax_checks.build(kind)
  on_jax.load_weights(os.path.join(directory, f"jax_{kind}_steps.weights.h5"))
  start = jax_checks.build(kind)
  start.load_weights(os.path.join(directory, f"{kind}.weights.h5"))
  moved = max(_relative(a.numpy(), b.numpy()) for a, b in
              zip(model.trainable_variables, start.trainable_variables))
  assert moved > 1e-3   # the steps changed the weights: equality below is not trivial
  _assert_same_weights(model, on_jax, 1e-4)


def test_two_jax_devices_equal_one(jax_run):
  directory, _, jax_out = jax_run
  assert int(jax_out["resnet_2dev_sharded"]) == 2   # the variables lived on both devices
  np.testing.assert_allclose(jax_out["resnet_2dev_logs"], jax_out["resnet_logs"], rtol=1e-5)
  one, two = jax_checks.build("resnet"), jax_checks.build("resnet")
  one.load_weights(os.path.join(directory, "jax_resnet_steps.weights.h5"))
  two.load_weights(os.path.join(directory, "jax_resnet_2dev.weights.h5"))
  _assert_same_weights(one, two, 1e-4)


def test_jax_export_loads_in_tensorflow_with_the_same_features(jax_run):
  directory, inputs, jax_out = jax_run
  loaded = tf.saved_model.load(os.path.join(directory, "jax_encoder"))
  images = inputs["views"][:jax_checks.BATCH, 0]
  features = loaded.serve(tf.constant(images)).numpy()
  assert _relative(jax_out["resnet_features"], features) < 1e-5
  # ... and the JAX-trained weights in a TensorFlow encoder give them too.
  model = jax_checks.build("resnet")
  model.load_weights(os.path.join(directory, "jax_resnet_steps.weights.h5"))
  assert _relative(jax_out["resnet_features"],
                   model.encoder(images, training=False).numpy()) < 1e-4


def test_jax_model_saved_and_reloaded_trains_on_as_if_never_saved(jax_run):
  _, _, jax_out = jax_run
  assert int(jax_out["resnet_reloaded_step"]) == 2 * jax_checks.STEPS
  np.testing.assert_allclose(jax_out["resnet_reloaded_logs"],
                             jax_out["resnet_continued_logs"], rtol=1e-6)


def test_jax_encoder_saved_as_keras_loads_in_tensorflow(jax_run):
  import keras
  directory, inputs, jax_out = jax_run
  encoder = keras.models.load_model(os.path.join(directory, "jax_encoder.keras"))
  features = encoder(inputs["views"][:jax_checks.BATCH, 0], training=False).numpy()
  assert _relative(jax_out["resnet_features"], features) < 1e-5


@pytest.mark.parametrize("kind", jax_checks.KINDS)
def test_encoder_variables_come_in_the_same_order_on_both_backends(jax_run, kind):
  # What lets a TensorFlow process read a JAX workdir's checkpoint (keras_state.py).
  _, _, jax_out = jax_run
  ours = [f"{v.path} {tuple(v.shape)}" for v in jax_checks.build(kind).encoder.variables]
  assert list(jax_out[f"{kind}_encoder_variables"]) == ours


def _train(*args, backend_flag=True):
  """The train command on JAX: --backend=jax, KERAS_BACKEND=jax (False), or neither
  (None: the flagfile says it)."""
  env = dict(helpers.ENV)
  if backend_flag:
    args = (*args, "--backend=jax")
  elif backend_flag is False:
    env["KERAS_BACKEND"] = "jax"
  proc = subprocess.run([sys.executable, "-m", "corinfomax_tf.train",
                         f"--flagfile={helpers.SMOKE}", "--deterministic", *args],
                        env=env, cwd=helpers.ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_train_command_on_jax_resumes_exactly_exports_and_probes(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  _train(f"--workdir={straight}", "--extend_epochs=1", "--probe_epochs=0")
  # Stopped after 2 epochs (probed and exported there), then trained 1 more: resumed
  # from its checkpoint in a new process.
  out = _train(f"--workdir={resumed}", "--export", "--probe_epochs=2",
               backend_flag=False)
  assert "XLA for the training step: on (JAX compiles every step with XLA)" in out
  summary = json.load(open(os.path.join(resumed, "summary.json")))
  assert summary["step"] == 6 and 0 <= summary["probe"]["top1"] <= 100
  export = os.path.join(resumed, "export")
  features = tf.saved_model.load(export).signatures["serving_default"](
      images=tf.zeros((2, 8, 8, 3), tf.uint8))["features"]
  assert features.shape[0] == 2 and np.all(np.isfinite(features.numpy()))
  with open(os.path.join(resumed, "flags.cfg")) as fh:
    assert "--backend=jax" in fh.read().splitlines()
  out = _train(f"--flagfile={resumed}/flags.cfg", "--extend_epochs=1", "--probe_epochs=0",
               "--noexport", backend_flag=None)
  assert "Resumed from" in out
  # Back on TensorFlow, the workdir says which backend it belongs to.
  proc = helpers.run([sys.executable, "-m", "corinfomax_tf.train",
                      f"--flagfile={resumed}/flags.cfg", "--backend=tensorflow"],
                     env=helpers.ENV, cwd=helpers.ROOT, capture_output=True, text=True,
                     timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: --backend=tensorflow: the workdir {resumed} was trained with --backend=jax")
  assert helpers.checkpoint_state(resumed).keys() == helpers.checkpoint_state(
      straight).keys()
  helpers.assert_same_state(resumed, helpers.checkpoint_state(straight))
