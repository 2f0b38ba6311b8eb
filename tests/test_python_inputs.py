"""Inputs the Python API is given are checked by kind before any work: pixels of a
dtype or range that would silently train on wrong images, settings of the wrong
type, each one error naming the argument; a run that learns nothing from its first
steps says so."""

import numpy as np
import pytest
import tensorflow as tf

import corinfomax_tf
from corinfomax_tf import errors
from corinfomax_tf.data import datasets

PIXELS = (np.arange(4 * 8 * 8 * 3) % 256).reshape(4, 8, 8, 3)


def test_uint8_and_float_in_0_1_are_accepted():
  datasets.check_image_kind(tf.data.Dataset.from_tensor_slices(PIXELS.astype("uint8")))
  datasets.check_image_kind(tf.data.Dataset.from_tensor_slices(
      (PIXELS / 255.0).astype("float32")))
  labelled = tf.data.Dataset.from_tensor_slices(
      {"image": (PIXELS / 255.0).astype("float32"), "label": np.arange(4)})
  datasets.check_image_kind(labelled)


@pytest.mark.parametrize("pixels, error, needle", [
    (PIXELS.astype("int32"), TypeError,
     "images: pixels must be uint8 (0..255) or float in [0, 1]; found int32 with values "
     "0..255 in the first 4 images: cast them with tf.cast(image, tf.uint8)"),
    (PIXELS.astype("float32"), ValueError,
     "images: float pixels must be in [0, 1] (the convention of "
     "tf.image.convert_image_dtype); found float32 with values 0..255 in the first 4 "
     "images: divide them by 255"),
    (PIXELS.astype("uint16") * 200, TypeError, "found uint16 with values 0..51000"),
    ((PIXELS / 255.0 - 0.5).astype("float64"), ValueError, "found float64 with values -0.5.."),
])
def test_pixels_that_would_train_on_wrong_images_are_refused(pixels, error, needle):
  with pytest.raises(error) as e:
    datasets.check_image_kind(tf.data.Dataset.from_tensor_slices((pixels, np.arange(4))))
  assert needle in str(e.value), e.value


def test_pretrain_refuses_such_images_and_settings_of_the_wrong_type(tmp_path):
  good = tf.data.Dataset.from_tensor_slices(PIXELS.astype("uint8"))
  common = dict(workdir=str(tmp_path / "w"), image_size=8, epochs=1, batch_size=2)
  with pytest.raises(TypeError, match=r"found int32 with values 0\.\.255"):
    corinfomax_tf.pretrain(lambda: None, tf.data.Dataset.from_tensor_slices(
        PIXELS.astype("int32")), **common)
  with pytest.raises(TypeError, match=r"^lr must be a number \(as the train command's "
                     r"--lr\)\. Received: lr='fast'$"):
    corinfomax_tf.pretrain(lambda: None, good, lr="fast", **common)
  with pytest.raises(TypeError, match="epochs must be an integer.*Received: epochs=1.5"):
    corinfomax_tf.pretrain(lambda: None, good, **{**common, "epochs": 1.5})
  with pytest.raises(TypeError, match="export must be True or False"):
    corinfomax_tf.pretrain(lambda: None, good, export="yes", **common)
  with pytest.raises(TypeError, match="workdir must be a path"):
    corinfomax_tf.pretrain(lambda: None, good, **{**common, "workdir": 3})
  with pytest.raises(TypeError, match="n_trials must be an integer"):
    corinfomax_tf.sweep(["alpha:log:1:2"], workdir=str(tmp_path / "s"), n_trials="3")
  # A range error is a ValueError too (ConfigError), so `except ValueError` works.
  with pytest.raises(ValueError, match="--lr=-1.0: must be > 0"):
    corinfomax_tf.pretrain(lambda: None, good, lr=-1.0, **common)
  assert issubclass(errors.ConfigError, ValueError)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(image_size="8", batch_size=4), TypeError, "image_size must be an integer. "
     "Received: image_size='8'"),
    (dict(image_size=8, batch_size=4.0), TypeError, "batch_size must be an integer"),
    (dict(image_size=8, batch_size=1), ValueError, "batch_size must be >= 2"),
])
def test_two_views_checks_its_arguments(kwargs, error, needle):
  images = tf.data.Dataset.from_tensor_slices(PIXELS.astype("uint8"))
  with pytest.raises(error, match=needle):
    corinfomax_tf.two_views(images, **kwargs)


@pytest.mark.slow
def test_a_run_that_learns_nothing_from_its_first_steps_warns(tmp_path):
  black = tf.data.Dataset.from_tensor_slices(np.zeros((64, 8, 8, 3), "uint8"))
  lines = []
  summary = corinfomax_tf.pretrain(
      lambda: corinfomax_tf.CorInfoMaxBackbone(depth=18, stem="cifar", width=4,
                                               image_size=8),
      black, workdir=str(tmp_path / "w"), image_size=8, epochs=2, batch_size=16,
      steps_per_epoch=3, projector="32-16", export=False, probe_epochs=0,
      preview_images=0, log=lines.append, verbose=0)
  warned = [w for w in summary["health_warnings"] if "both about 0" in w]
  assert warned and "all black?" in warned[0], summary["health_warnings"]
  assert any(line.startswith("warning: steps 1-5: attraction") for line in lines)
