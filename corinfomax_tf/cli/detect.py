r"""Detection fine-tuning: the exported encoder as the backbone of a keras-hub RetinaNet.

    python -m corinfomax_tf.detect --encoder=runs/digits/export \
        --flagfile=configs/detection_generated.cfg
    python -m corinfomax_tf.detect --encoder=runs/in1k/export \
        --flagfile=configs/detection_coco.cfg --tfds_data_dir=/data/tfds

See corinfomax_tf/downstream/detection.py. `--init=random` trains the same detector
from a randomly initialised encoder: the baseline for the pretrained one.

Data (`--dataset`): "generated" (the project's offline set of digits pasted on
backgrounds, the default), "coco_json" (a COCO-format annotation file + image folder
per split, every box checked before training), or a tfds detection set (coco/2017).
"""

import json

from absl import flags

from corinfomax_tf import errors
from corinfomax_tf.cli import runner


def define_flags():
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_encoder_flag("Encoder export directory (or training workdir).")
  flags.DEFINE_string("workdir", "", "Checkpoints, logs and results; default: "
                      "<encoder's parent>/detect_<dataset>_<init>.")
  from corinfomax_tf import config
  flags_lib.define_config_flags(config.DetectionDataConfig)
  flags_lib.define_config_flags(config.DetectConfig)


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.detect_from_flags(flag_values)
  runner.start_tensorflow()
  from corinfomax_tf.data import detection as detection_data
  from corinfomax_tf.downstream import detection
  from corinfomax_tf.export import saved_model
  from corinfomax_tf.models import detector as detector_lib
  from corinfomax_tf.models import factory
  encoder, metadata = saved_model.load_trainable_encoder(cfg.encoder)
  if "stem" not in metadata["architecture"]:
    raise errors.ConfigError(
        f"--encoder={cfg.encoder}: detection builds its feature pyramid from our ResNet's "
        f"stages, and this encoder is a {metadata['architecture'].get('backbone')} "
        "(linear-eval, knn-eval, finetune and embed take any backbone)")
  detector_lib.check_settings(metadata["architecture"]["stem"], cfg.data.image_size,
                              cfg.min_level, cfg.max_level)
  if cfg.init == "random":
    encoder = factory.random_encoder(metadata["architecture"], cfg.seed + 1)
  source = detection_data.load_detection_source(cfg.data)
  result = detection.run_detection(encoder, metadata, source, cfg, log=runner.log)
  runner.log(json.dumps({k: v for k, v in result.items()
                         if k not in ("history", "per_class_AP", "class_names")},
                        sort_keys=True))


def run():
  runner.run(main, define_flags, required=[("encoder", "an encoder export directory")])
