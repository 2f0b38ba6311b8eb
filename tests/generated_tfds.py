"""A tiny tensorflow-datasets builder whose examples are generated: the tfds code path
without a download."""

import numpy as np
import tensorflow_datasets as tfds

NAME = "corinfomax_generated_images"


class CorinfomaxGeneratedImages(tfds.core.GeneratorBasedBuilder):
  """Random RGB images of a few sizes, three classes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 30), "test": self._generate_examples(1, 9)}

  def _generate_examples(self, seed, count):
    rs = np.random.RandomState(seed)
    for i in range(count):
      image = rs.randint(0, 256, (10 + i % 3, 12, 3)).astype(np.uint8)
      yield i, {"image": image, "label": i % 3}


def prepare(data_dir):
  tfds.builder(NAME, data_dir=data_dir).download_and_prepare()
