"""CorInfoMax as a Keras model: `model.save` / `load_model` continues training with its
optimizer state and schedule, and `fit` names the inputs it cannot take."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import corinfomax_tf


def _model():
  keras.utils.set_random_seed(0)
  # A small functional CNN with no BatchNorm: its step is a function of the weights
  # alone, so a reloaded model can be compared with one never saved.
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  backbone = keras.Model(inputs, x)
  return corinfomax_tf.CorInfoMax(backbone, projector="8-4", loss={"alpha": 10.0})


def _views(count=24, seed=0):
  rs = np.random.RandomState(seed)
  return rs.normal(size=(count, 2, 8, 8, 3)).astype("float32")


def _batches(views, skip=0):
  return tf.data.Dataset.from_tensor_slices(views).batch(4).skip(skip)


def _state(model):
  return [keras.ops.convert_to_numpy(v) for v in model.weights] + [
      keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]


def test_a_saved_model_reloads_and_trains_on_as_if_never_saved(tmp_path):
  views = _views()
  straight = _model()
  straight.compile(warmup_epochs=1)
  straight.fit(_batches(views), epochs=2, steps_per_epoch=3, verbose=0)

  first = _model()
  first.compile(warmup_epochs=1)
  first.fit(_batches(views), epochs=1, steps_per_epoch=3, verbose=0)
  path = str(tmp_path / "m.keras")
  first.save(path)
  config = first.get_compile_config()
  assert (config["total_steps"], config["warmup_steps"]) == (3, 3)

  loaded = keras.models.load_model(path)
  assert loaded.optimizer is not None and int(loaded.optimizer.iterations) == 3
  assert int(loaded.step_counter.numpy()) == 3
  for got, want in zip(_state(loaded), _state(first)):
    np.testing.assert_array_equal(got, want)
  # Trained on (the schedule is the one compile fixed at the first fit: 3 steps,
  # then the cosine's end; the straight run's was 6 steps).
  resumed = _model()
  resumed.compile(warmup_epochs=1, total_steps=6, warmup_steps=3)
  resumed.fit(_batches(views), epochs=1, steps_per_epoch=3, verbose=0)
  resumed.save(path)
  loaded = keras.models.load_model(path)
  loaded.fit(_batches(views, skip=3), epochs=1, steps_per_epoch=3, verbose=0)
  assert int(loaded.step_counter.numpy()) == 6
  for got, want in zip(_state(loaded), _state(straight)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_keras_optimizer_round_trips_too(tmp_path):
  model = _model()
  model.compile(keras.optimizers.Adam(1e-3))
  model.fit(_batches(_views()), epochs=1, steps_per_epoch=2, verbose=0)
  path = str(tmp_path / "adam.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.optimizer, keras.optimizers.Adam)
  assert int(loaded.optimizer.iterations) == 2
  loaded.fit(_batches(_views(), skip=2), epochs=1, steps_per_epoch=1, verbose=0)
  assert int(loaded.optimizer.iterations) == 3


def test_fit_on_an_array_of_views_sizes_the_schedule_from_it():
  model = _model()
  model.compile(warmup_epochs=1)
  model.fit(_views(12), batch_size=4, epochs=2, verbose=0)
  assert int(model.step_counter.numpy()) == 6
  assert model.get_compile_config()["total_steps"] == 6


@pytest.mark.parametrize("x, needle", [
    (np.zeros((12, 8, 8, 3), "uint8"),
     r"Received: x with shape \(12, 8, 8, 3\) \(single images\)"),
    (np.zeros((12, 8, 8), "float32"), r"Received: x with shape \(12, 8, 8\)"),
    (np.zeros((12, 3, 8, 8, 3), "float32"), r"Received: x with shape \(12, 3, 8, 8, 3\)"),
])
def test_fit_names_arrays_that_are_not_stacked_views(x, needle):
  model = _model()
  model.compile(warmup_epochs=1)
  with pytest.raises(ValueError, match=needle) as info:
    model.fit(x, epochs=1, verbose=0)
  assert "\n" not in str(info.value)
  if x.ndim == 4:
    assert "corinfomax_tf.two_views(" in str(info.value)
  with pytest.raises(ValueError, match=needle):
    model.fit((x, np.zeros(12, "int64")), epochs=1, verbose=0)


def test_fit_on_another_backend_is_one_line(monkeypatch):
  model = _model()
  model.compile(warmup_epochs=1)
  monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
  with pytest.raises(RuntimeError, match=r"^CorInfoMax trains on Keras' TensorFlow or JAX "
                     r"backend; this one is 'torch' \(KERAS_BACKEND\)") as info:
    model.fit(_batches(_views()), epochs=1, steps_per_epoch=1, verbose=0)
  assert "\n" not in str(info.value)
