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

Importing the package registers its Keras classes (the ResNet backbone, projector,
loss layer, schedule and optimizer), so a keras-hub preset written by an export
loads with `keras_hub.models.Backbone.from_preset(path)` wherever the package is
installed.
"""

import os

# Before TensorFlow starts: keep its C++ start-up chatter (INFO lines) off the console.
# A value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.10.0"

# isort: off
from corinfomax_tf.errors import UserError  # noqa: E402
from corinfomax_tf.models.backbone import CorInfoMaxBackbone  # noqa: E402
from corinfomax_tf.models.projector import Projector  # noqa: E402
from corinfomax_tf.models.pooling import pooled_model  # noqa: E402
from corinfomax_tf.method.losses import CorInfoMaxLoss  # noqa: E402
from corinfomax_tf.method.model import CorInfoMax  # noqa: E402
from corinfomax_tf.data.augment import ViewConfig  # noqa: E402
from corinfomax_tf.data.datasets import PAPER_VIEWS, two_views  # noqa: E402
from corinfomax_tf.training.pretraining import pretrain  # noqa: E402
from corinfomax_tf.export.saved_model import load_encoder, load_preset  # noqa: E402
from corinfomax_tf.export.saved_model import export_workdir  # noqa: E402
from corinfomax_tf.tuning.sweep import sweep  # noqa: E402

__all__ = ["CorInfoMax", "CorInfoMaxLoss", "CorInfoMaxBackbone", "Projector",
           "ViewConfig", "PAPER_VIEWS", "two_views", "pretrain", "pooled_model",
           "export_workdir", "load_encoder", "load_preset", "sweep", "UserError"]
