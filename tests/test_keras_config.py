"""Every Keras class the package registers round-trips through its config.

As keras-hub's shared TestCase does for its classes: each registered class is built
with non-default values for every constructor argument, and `from_config(get_config())`
must give the same config, holding each of those values. A class registered without
an example here fails the test, so a new class cannot skip it.
"""

import inspect

import keras
import pytest

# Importing the modules registers their classes.
from corinfomax_tf.method import losses  # noqa: F401
from corinfomax_tf.method import model  # noqa: F401
from corinfomax_tf.models import backbone  # noqa: F401
from corinfomax_tf.models import fused_batch_norm  # noqa: F401
from corinfomax_tf.models import pooling  # noqa: F401
from corinfomax_tf.models import projector  # noqa: F401
from corinfomax_tf.training import schedules  # noqa: F401


def _pretraining_model():
  tiny = backbone.CorInfoMaxBackbone(depth=18, width=2, image_size=8)
  return dict(backbone=tiny,
              projector=projector.Projector(input_dim=16, spec="8-4", name="projector"),
              loss=losses.CorInfoMaxLoss(dim=4, alpha=7.0, name="corinfomax_loss"),
              projector_bn=True, l2_normalize=False, sync_batch_norm=True,
              probe_classes=3, probe_learning_rate=0.5, vector_logs=True)


EXAMPLES = {
    "CorInfoMaxLoss": dict(dim=8, alpha=3.0, cov_weight=0.5, la_R=0.1, la_mu=0.2, eps=1e-6,
                           R_ini=0.5, covariance="shared", track_cross_covariance=False),
    "L2Normalize": dict(epsilon=1e-6),
    "Projector": dict(input_dim=8, spec="16-4", batch_norm=True, l2_normalize=False,
                      sync_batch_norm=True),
    "CorInfoMaxBackbone": dict(depth=34, stem="imagenet", width=4, image_size=32,
                               sync_batch_norm=True, fused_batch_norm=True,
                               dtype="float64"),
    "FusedBatchNormalization": dict(
        axis=2, momentum=0.8, epsilon=1e-4, center=False, scale=False,
        beta_initializer=keras.initializers.Constant(0.5),
        gamma_initializer=keras.initializers.Constant(2.0),
        moving_mean_initializer=keras.initializers.Constant(0.1),
        moving_variance_initializer=keras.initializers.Constant(3.0),
        beta_regularizer=keras.regularizers.L2(0.01),
        gamma_regularizer=keras.regularizers.L1(0.02),
        beta_constraint=keras.constraints.NonNeg(),
        gamma_constraint=keras.constraints.MaxNorm(2.0), renorm=True,
        renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}, renorm_momentum=0.9,
        synchronized=True),
    "WarmupCosine": dict(base_lr=0.3, total_steps=100, warmup_steps=10,
                         warmup_start_lr=0.01, min_lr=1e-4, steps_per_update=3),
    "ExtendedSchedule": dict(
        base=schedules.WarmupCosine(base_lr=0.3, total_steps=10, warmup_steps=2),
        base_steps=10, phases=[[4, None], [5, 0.2]], min_lr=1e-3),
    "ReferenceSGD": dict(learning_rate=0.1, momentum=0.8, l2_weight_decay=1e-3),
    "TokenPooling": dict(class_token=False),
    "CorInfoMax": _pretraining_model(),
}


def registered():
  return {key.split(">", 1)[1]: cls for key, cls in
          keras.saving.get_custom_objects().items() if key.startswith("corinfomax_tf>")}


def test_every_registered_class_has_an_example():
  assert set(registered()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_round_trips_every_constructor_argument(name):
  cls = registered()[name]
  kwargs = EXAMPLES[name]
  arguments = [p for p in inspect.signature(cls.__init__).parameters.values()
               if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  # The example sets every argument, each to a value other than its default.
  assert {p.name for p in arguments} - {"name"} == set(kwargs), name
  for p in arguments:
    if p.name in kwargs and p.default is not p.empty:
      assert kwargs[p.name] is not p.default and kwargs[p.name] != p.default, (name, p.name)
  obj = cls(**kwargs)
  config = obj.get_config()
  for key, value in kwargs.items():
    got = config[key]
    if key == "dtype":  # keras-hub serialises the policy
      got = keras.dtype_policies.deserialize(got).name
    if isinstance(value, (keras.layers.Layer, keras.optimizers.schedules.LearningRateSchedule,
                          keras.initializers.Initializer, keras.regularizers.Regularizer,
                          keras.constraints.Constraint)):
      # nested objects: as Keras serialises them
      value = keras.saving.serialize_keras_object(value)
    assert got == pytest.approx(value) if isinstance(value, float) else \
        got == value, (name, key, config.get(key))
  again = cls.from_config(config).get_config()
  assert again == config
