"""kNN and linear-probe arithmetic on hand-made features; the online probe."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf import config
from corinfomax_tf.evaluation import probes as evaluation
from corinfomax_tf.training import schedules
from corinfomax_tf.method import model as ssl_model


def test_knn_weighted_votes_on_hand_made_features():
  # One training point of class 0 very close to the query, two of class 1 further
  # away: plain majority says 1, temperature-weighted votes say 0.
  train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]], np.float32)
  labels = np.array([0, 1, 1])
  query = np.array([[1.0, 0.01]], np.float32)
  sharp = evaluation.knn_classify(train, labels, query, 2, k=3, temperature=0.07)
  assert sharp.argmax(1)[0] == 0
  flat = evaluation.knn_classify(train, labels, query, 2, k=3, temperature=100.0)
  assert flat.argmax(1)[0] == 1
  sim = train @ query[0] / np.linalg.norm(train, axis=1) / np.linalg.norm(query[0])
  np.testing.assert_allclose(sharp[0], [np.exp(sim[0] / 0.07), 2 * np.exp(sim[1] / 0.07)],
                             rtol=1e-4)


@pytest.mark.slow
def test_knn_and_probe_on_separable_clusters():
  rs = np.random.RandomState(0)
  centres = rs.randn(4, 16) * 3
  y_tr, y_te = rs.randint(0, 4, 200), rs.randint(0, 4, 80)
  x_tr = (centres[y_tr] + rs.randn(200, 16)).astype(np.float32)
  x_te = (centres[y_te] + rs.randn(80, 16)).astype(np.float32)
  knn = evaluation.knn_evaluate(x_tr, y_tr, x_te, y_te, 4, ks=(20, 200))
  assert knn["k20_top1"] > 90 and knn["k200_top1"] > 60
  probe = evaluation.linear_probe(x_tr, y_tr, x_te, y_te, 4, epochs=30)
  assert probe["top1"] > 90
  assert evaluation.topk_accuracy(np.eye(4)[[1, 2]], np.array([1, 3]), ks=(1,)) == {"top1": 50.0}


@pytest.mark.parametrize("samples,batch_size,epochs,seed",
                         [(37, 8, 7, 0), (32, 8, 5, 3), (6, 256, 40, 1)])
def test_the_probe_classifier_trains_bit_for_bit_as_keras_fit_on_arrays(
    samples, batch_size, epochs, seed):
  # The probe's one repeated dataset against the Keras call it replaces (a partial
  # last batch, none, and one batch an epoch as on tiny labelled sets).
  rs = np.random.RandomState(seed)
  x = rs.randn(samples, 5).astype(np.float32)
  y = rs.randint(0, 3, samples)
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(shape=(5,))
  expected = keras.Model(inputs, keras.layers.Dense(3)(inputs))
  expected.compile(optimizer=keras.optimizers.Adam(1e-3),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  expected.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True)
  got = evaluation.train_classifier(x, y, 3, epochs=epochs, batch_size=batch_size,
                                    learning_rate=1e-3, seed=seed)
  assert int(got.optimizer.iterations.numpy()) == epochs * -(-samples // batch_size)
  for want, have in zip(expected.weights, got.weights):
    np.testing.assert_array_equal(have.numpy(), want.numpy())
  if samples > batch_size:   # the order matters: fit without shuffling differs
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(5,))
    unshuffled = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    unshuffled.compile(optimizer=keras.optimizers.Adam(1e-3),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    unshuffled.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False)
    assert not np.array_equal(unshuffled.weights[0].numpy(), got.weights[0].numpy())


def _model(probe_classes):
  keras.utils.set_random_seed(0)
  model = ssl_model.build_pretraining_model(
      config.ModelConfig(width=4, projector="16-8"), config.LossConfig(alpha=10.0),
      probe_classes=probe_classes)
  opt = schedules.ReferenceSGD(0.05)
  model.compile(optimizer=opt)
  opt.build(model.pretraining_variables)
  return model


@pytest.mark.slow
def test_online_probe_leaves_pretraining_gradients_unchanged():
  rs = np.random.RandomState(0)
  views = rs.rand(16, 2, 8, 8, 3).astype(np.float32)
  labels = rs.randint(0, 3, 16)
  ds = tf.data.Dataset.from_tensor_slices((views, labels)).batch(8)
  plain, probed = _model(0), _model(3)
  assert probed.probe_head is not None
  h_plain = plain.fit(ds, epochs=1, verbose=0, shuffle=False).history
  head_before = probed.probe_head.kernel.numpy().copy()
  h_probed = probed.fit(ds, epochs=2, verbose=0, shuffle=False).history
  # The probe is excluded from the pretraining variables.
  names = {v.path for v in probed.pretraining_variables}
  assert not any("online_probe" in n for n in names)
  # Same loss and same encoder weights after the first epoch as without the probe:
  np.testing.assert_array_equal(h_probed["loss"][0], h_plain["loss"][0])
  assert "probe_top1" in h_probed and "probe_top1" not in h_plain
  assert not np.allclose(head_before, probed.probe_head.kernel.numpy())


@pytest.mark.slow
def test_online_probe_does_not_change_encoder_updates():
  rs = np.random.RandomState(1)
  views = rs.rand(8, 2, 8, 8, 3).astype(np.float32)
  labels = rs.randint(0, 3, 8)
  ds = tf.data.Dataset.from_tensor_slices((views, labels)).batch(8)
  plain, probed = _model(0), _model(3)
  plain.fit(ds, epochs=1, verbose=0, shuffle=False)
  probed.fit(ds, epochs=1, verbose=0, shuffle=False)
  for a, b in zip(plain.encoder.weights + plain.projector.weights,
                  probed.encoder.weights + probed.projector.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  for name in ("mu1", "R1", "mu2", "R2"):
    np.testing.assert_array_equal(getattr(plain.loss_layer, name).numpy(),
                                  getattr(probed.loss_layer, name).numpy())


def test_linear_evaluation_head_starts_as_torch_nn_linear():
  from corinfomax_tf.evaluation import linear
  keras.utils.set_random_seed(0)
  head = linear.linear_head(10, 400)
  kernel, bias = (np.asarray(v) for v in (head.kernel, head.bias))
  assert kernel.shape == (400, 10) and bias.shape == (10,)
  # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias.
  assert np.abs(kernel).max() <= 0.05 and np.abs(kernel).max() > 0.049
  assert np.abs(bias).max() <= 0.05 and np.abs(bias).min() > 0
  np.testing.assert_allclose(kernel.std(), 0.05 / np.sqrt(3), rtol=0.05)
