"""CorInfoMax self-supervised pretraining for TensorFlow 2 / Keras 3, on any backbone.

    import corinfomax_tf

    model = corinfomax_tf.CorInfoMax(backbone, projector="2048-2048-64")
    model.compile()                      # the paper's SGD, warm-up and cosine
    model.fit(corinfomax_tf.two_views(images, image_size=32, batch_size=256),
              epochs=100, steps_per_epoch=195)

or, with the `train` command's whole lifecycle (locked workdir, exact resume, guards,
monitors, export):

    summary = corinfomax_tf.pretrain(backbone, images, workdir="runs/mine",
                                     image_size=32, epochs=100, batch_size=256)

`import corinfomax_tf` is instant: each name below is imported at its first use
(TensorFlow with it), so the command line shows its usage without starting
TensorFlow. Using the API registers the package's Keras classes (the ResNet backbone,
projector, loss layer, schedule and optimizer); a keras-hub preset written by an
export loads with `keras_hub.models.Backbone.from_preset(path)` after
`import corinfomax_tf.models.backbone` (or with `corinfomax_tf.load_preset(path)`).
"""

import importlib

__version__ = "0.15.1"

# Public name -> the module that defines it.
_API = {
    "UserError": "corinfomax_tf.errors",
    "CorInfoMaxBackbone": "corinfomax_tf.models.backbone",
    "FusedBatchNormalization": "corinfomax_tf.models.fused_batch_norm",
    "Projector": "corinfomax_tf.models.projector",
    "pooled_model": "corinfomax_tf.models.pooling",
    "CorInfoMaxLoss": "corinfomax_tf.method.losses",
    "CorInfoMax": "corinfomax_tf.method.model",
    "ViewConfig": "corinfomax_tf.data.views",
    "PAPER_VIEWS": "corinfomax_tf.data.datasets",
    "two_views": "corinfomax_tf.data.datasets",
    "pretrain": "corinfomax_tf.training.pretraining",
    "load_encoder": "corinfomax_tf.export.saved_model",
    "load_preset": "corinfomax_tf.export.saved_model",
    "export_workdir": "corinfomax_tf.export.saved_model",
    "sweep": "corinfomax_tf.tuning.sweep",
}

__all__ = ["CorInfoMax", "CorInfoMaxLoss", "CorInfoMaxBackbone", "Projector",
           "ViewConfig", "PAPER_VIEWS", "two_views", "pretrain", "pooled_model",
           "export_workdir", "load_encoder", "load_preset", "sweep", "UserError",
           "FusedBatchNormalization"]


def __getattr__(name):
  """Imports a public name at its first use (PEP 562)."""
  if name not in _API:
    raise AttributeError(f"module 'corinfomax_tf' has no attribute {name!r}")
  value = getattr(importlib.import_module(_API[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_API))
