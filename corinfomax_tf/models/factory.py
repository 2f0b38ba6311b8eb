"""The one place an encoder is built: from a config, an export's metadata, or a seed.

Pretraining, the probes, export, fine-tuning and detection all build their encoder
here, so that one architecture description (depth, stem, width) means one network.
"""


def encoder(depth, stem, width, *, name="encoder", sync_batch_norm=False, image_size=None):
  """A `backbone.CorInfoMaxBackbone`: the last feature map (pool it with
  `backbone.pooled_model`), `pyramid_outputs` for detection."""
  from corinfomax_tf.models import backbone
  return backbone.CorInfoMaxBackbone(depth=depth, stem=stem, width=width,
                                     image_size=image_size,
                                     sync_batch_norm=sync_batch_norm, name=name)


def encoder_from_architecture(architecture, *, name="encoder"):
  """From a dict holding depth, stem and width: a training config's "model" section
  or an export's metadata["architecture"]."""
  return encoder(architecture["depth"], architecture["stem"], architecture["width"],
                 name=name)


def random_encoder(architecture, seed, *, name="encoder"):
  """The same architecture from a random initialisation drawn from `seed`: the
  baseline a pretrained encoder has to beat."""
  import keras
  keras.utils.set_random_seed(seed)
  return encoder_from_architecture(architecture, name=name)
