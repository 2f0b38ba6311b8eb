"""Two logical CPU replicas give what one replica gives on the concatenated batch."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf import config
from corinfomax_tf.training import schedules
from corinfomax_tf.method import model as ssl_model
from corinfomax_tf.models.fused_batch_norm import FusedBatchNormalization
from tests.conftest import CPU_DEVICES, mirrored
from corinfomax_tf import errors

MODEL = config.ModelConfig(width=4, projector="32-16", sync_bn=True)
LOSS = config.LossConfig(alpha=50.0, la_R=0.1, la_mu=0.1)
BATCH = 8


def batches(steps=2, seed=0):
  rs = np.random.RandomState(seed)
  x1 = rs.rand(steps * BATCH, 12, 12, 3).astype("float32")
  x2 = rs.rand(steps * BATCH, 12, 12, 3).astype("float32")
  labels = rs.randint(0, 3, steps * BATCH)
  return tf.data.Dataset.from_tensor_slices((np.stack([x1, x2], axis=1), labels)).batch(
      BATCH, drop_remainder=True)


def build(strategy, covariance="per_branch", sync_bn=None, fused_batch_norm=False):
  keras.utils.set_random_seed(0)
  loss_cfg = config.LossConfig(**{**LOSS.__dict__, "covariance": covariance})
  if sync_bn is None:
    sync_bn = strategy.num_replicas_in_sync > 1
  model_cfg = dataclasses.replace(MODEL, fused_batch_norm=fused_batch_norm)
  with strategy.scope():
    model = ssl_model.build_pretraining_model(model_cfg, loss_cfg, sync_bn=sync_bn)
    opt = schedules.ReferenceSGD(0.05, momentum=0.9, l2_weight_decay=1e-4)
    model.compile(optimizer=opt)
    opt.build(model.trainable_variables)
  return model


def gradients(model, strategy, dataset):
  """Per-variable gradients of the first batch, summed over replicas as the optimizer
  sums them."""
  data = next(iter(strategy.experimental_distribute_dataset(dataset)))

  @tf.function
  def step(data):
    def fn(data):
      x1, x2 = ssl_model.split_views(data[0])
      with tf.GradientTape() as tape:
        terms = model.compute_loss_terms(x1, x2, training=True)
        loss = tf.cast(terms["loss"], tf.float32) / strategy.num_replicas_in_sync
      return tape.gradient(loss, model.trainable_variables), terms["loss"]
    grads, loss = strategy.run(fn, (data,))
    return ([strategy.reduce("SUM", g, axis=None) for g in grads],
            strategy.experimental_local_results(loss))
  return step(data)


def replica_values(variable):
  value = variable.value if hasattr(variable, "value") else variable
  if hasattr(value, "values"):
    return [v.numpy() for v in value.values]
  return [variable.numpy()]


@pytest.fixture
def strategies():
  """The default strategy and a two-replica one of the test's own (collective keys no
  other test's strategy uses: conftest.mirrored)."""
  return (tf.distribute.get_strategy(), mirrored(CPU_DEVICES[:2]))


@pytest.mark.slow
def test_two_replicas_give_the_one_replica_gradients(strategies):
  one, two = strategies
  grads1, loss1 = gradients(build(one), one, batches())
  grads2, loss2 = gradients(build(two), two, batches())
  assert len(loss2) == 2
  for value in loss2:
    np.testing.assert_allclose(value.numpy(), loss1[0].numpy(), rtol=1e-6)
  for g1, g2 in zip(grads1, grads2):
    np.testing.assert_allclose(g2.numpy(), g1.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("covariance", ["per_branch", "shared"])
def test_fit_on_two_replicas_matches_one_replica(strategies, covariance):
  one, two = strategies
  m1, m2 = build(one, covariance), build(two, covariance)
  h1 = m1.fit(batches(), epochs=1, verbose=0, shuffle=False).history
  h2 = m2.fit(batches(), epochs=1, verbose=0, shuffle=False).history
  for key in ("loss", "attraction", "cov"):
    np.testing.assert_allclose(h2[key], h1[key], rtol=1e-5)
  for name, var in m2.loss_layer.state.items():
    copies = replica_values(var)
    assert len(copies) == 2
    np.testing.assert_array_equal(copies[0], copies[1])   # replicas agree exactly
    np.testing.assert_allclose(copies[0], getattr(m1.loss_layer, name).numpy(),
                               rtol=1e-5, atol=1e-7)
  for w1, w2 in zip(m1.weights, m2.weights):
    copies = replica_values(w2)
    np.testing.assert_array_equal(copies[0], copies[-1])
    np.testing.assert_allclose(copies[0], w1.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fused_batch_norm_on_two_replicas_trains_as_the_keras_layer(strategies):
  """`--fused_batch_norm --nosync_bn` on two replicas: each replica normalises its own
  half with the fused op, and the run equals the unfused one to float32 rounding. The
  trainable weights stay equal on both replicas; the moving statistics are each
  replica's own (Keras' unsynchronised BatchNorm, as PyTorch's DDP without SyncBatchNorm;
  a checkpoint holds replica 0's) and equal the unfused layer's on the same replica."""
  _, two = strategies
  plain = build(two, sync_bn=False)
  fused = build(two, sync_bn=False, fused_batch_norm=True)
  assert any(isinstance(l, FusedBatchNormalization) for l in fused.encoder.layers)
  traced = tf.function(lambda x: fused.encoder(x, training=True)).get_concrete_function(
      tf.TensorSpec([BATCH, 12, 12, 3], tf.float32))
  assert "FusedBatchNormV3" in {op.type for op in traced.graph.get_operations()}
  h_plain = plain.fit(batches(), epochs=1, verbose=0, shuffle=False).history
  h_fused = fused.fit(batches(), epochs=1, verbose=0, shuffle=False).history
  for key in ("loss", "attraction", "cov"):
    np.testing.assert_allclose(h_fused[key], h_plain[key], rtol=1e-4)
  local = 0
  for w_plain, w_fused in zip(plain.weights, fused.weights):
    assert w_fused.path == w_plain.path
    ours, theirs = replica_values(w_fused), replica_values(w_plain)
    assert len(ours) == len(theirs) == 2
    if w_fused.trainable:
      np.testing.assert_array_equal(ours[0], ours[1])
    elif "moving_" in w_fused.path and not np.array_equal(ours[0], ours[1]):
      local += 1
    for mine, other in zip(ours, theirs):
      np.testing.assert_allclose(mine, other, rtol=1e-3, atol=1e-5, err_msg=w_fused.path)
  assert local > 0   # the replicas saw different halves


@pytest.mark.slow
def test_logged_loss_is_the_computed_loss(strategies):
  one, _ = strategies
  model = build(one)
  x1, x2 = ssl_model.split_views(next(iter(batches(steps=1)))[0])
  state = {k: tf.identity(v) for k, v in model.loss_layer.state.items()}
  history = model.fit(batches(steps=1), epochs=1, verbose=0, shuffle=False).history
  # Recompute the first step's loss from the starting state with a fresh model.
  fresh = build(one)
  for k, v in state.items():
    getattr(fresh.loss_layer, k).assign(v)
  expected = fresh.compute_loss_terms(x1, x2, training=True)
  np.testing.assert_allclose(history["loss"][0], expected["loss"].numpy(), rtol=1e-5)
  np.testing.assert_allclose(history["cov"][0], expected["cov"].numpy(), rtol=1e-5)


def test_keras_data_conventions_train_on_batch_evaluate_and_fit(strategies):
  """Views alone, (views, labels) and plain arrays all train; the step is the same."""
  one, _ = strategies
  views, labels = next(iter(batches(steps=1)))
  model = build(one)
  alone = model.train_on_batch(views.numpy(), return_dict=True)
  paired = build(one).train_on_batch(views, labels, return_dict=True)
  assert alone["loss"] == paired["loss"] and np.isfinite(alone["loss"])
  logs = model.evaluate(views.numpy(), batch_size=BATCH, verbose=0, return_dict=True)
  assert np.isfinite(logs["loss"]) and logs["grad_norm"] == 0.0
  history = model.fit(views.numpy(), batch_size=BATCH, epochs=2, verbose=0).history
  assert len(history["loss"]) == 2 and np.all(np.isfinite(history["cov"]))
  with pytest.raises(ValueError, match="sample weights"):
    model.train_on_batch(views, labels, sample_weight=np.ones(BATCH, "float32"))
  with pytest.raises(ValueError, match=r"Received: views with shape \(8, 12, 12, 3\)"):
    build(one).train_on_batch(views[:, 0])


def test_slurm_resolver_builds_the_cluster_from_slurm_variables(monkeypatch):
  from corinfomax_tf.training import distribute
  with pytest.raises(errors.ConfigError, match="--cluster_resolver=slurm: "
                     "SLURM_PROCID is not set"):
    for name in distribute.SLURM_VARIABLES:
      monkeypatch.delenv(name, raising=False)
    distribute.cluster_resolver("slurm")
  # What srun sets for task 1 of two tasks on two nodes.
  for name, value in (("SLURM_PROCID", "1"), ("SLURM_STEP_NUM_TASKS", "2"),
                      ("SLURM_STEP_NODELIST", "node[07-08]"),
                      ("SLURM_STEP_TASKS_PER_NODE", "1(x2)")):
    monkeypatch.setenv(name, value)
  resolver = distribute.cluster_resolver("slurm", port_base=9000)
  assert resolver.cluster_spec().as_dict() == {"worker": ["node07:9000", "node08:9000"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 1)
  assert distribute.cluster_resolver("tf_config") is None


@pytest.mark.slow
@pytest.mark.parametrize("replicas, poisoned", [(1, 0), (2, 1)])
def test_a_non_finite_gradient_stops_the_run_before_any_save(strategies, tmp_path,
                                                             monkeypatch, replicas,
                                                             poisoned):
  """A NaN in one replica's gradient (the loss still finite at that step) stops
  training at that step; no checkpoint of the poisoned weights is written."""
  from corinfomax_tf.training import callbacks
  from corinfomax_tf.training import workdir as workdir_lib
  strategy = strategies[replicas - 1]
  model = build(strategy)
  real_gradient = tf.GradientTape.gradient

  def poisoned_gradient(tape, target, sources, *args, **kwargs):
    grads = real_gradient(tape, target, sources, *args, **kwargs)
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group if ctx is not None else 0
    factor = tf.where(tf.equal(replica, poisoned), float("nan"), 1.0)
    return [grads[0] * factor] + list(grads[1:])
  monkeypatch.setattr(tf.GradientTape, "gradient", poisoned_gradient)

  with strategy.scope():
    checkpoints = workdir_lib.Checkpoints(tf.train.Checkpoint(encoder=model.encoder),
                                          str(tmp_path), keep=2)
  guard = callbacks.FiniteLossGuard(str(tmp_path))
  with pytest.raises(errors.TrainingStopped,
                     match=r"gradient norm is nan after step 1: training stopped"):
    model.fit(batches(), epochs=1, verbose=0, shuffle=False,
              callbacks=[guard, callbacks.CheckpointSaver(checkpoints)])
  assert checkpoints.latest is None
