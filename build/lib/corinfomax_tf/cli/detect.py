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
  flags.DEFINE_enum("init", "pretrained", ["pretrained", "random"],
                    "The export's encoder weights, or a random initialisation of the "
                    "same architecture (the baseline).")
  flags.DEFINE_string("dataset", "generated",
                      "generated | coco_json | a tfds detection set (coco/2017).")
  flags.DEFINE_string("tfds_data_dir", "", "tensorflow-datasets data_dir.")
  flags.DEFINE_string("train_split", "train", "tfds training split.")
  flags.DEFINE_string("test_split", "validation", "tfds evaluation split.")
  flags.DEFINE_string("train_annotations", "", "coco_json: training annotation file.")
  flags.DEFINE_string("train_images", "", "coco_json: training image directory.")
  flags.DEFINE_string("test_annotations", "", "coco_json: test annotation file.")
  flags.DEFINE_string("test_images", "", "coco_json: test image directory.")
  flags.DEFINE_integer("num_train_images", 512, "generated: training images.")
  flags.DEFINE_integer("num_test_images", 128, "generated: test images.")
  flags.DEFINE_integer("data_seed", 0, "generated: seed of the data set.")
  flags.DEFINE_integer("image_size", 48, "Detector input size (square).")
  flags.DEFINE_integer("max_boxes", 4, "Boxes kept per image (padding above).")
  flags.DEFINE_integer("min_level", 0, "Lowest pyramid level (0: by stem).")
  flags.DEFINE_integer("max_level", 0, "Highest pyramid level (0: by stem).")
  flags.DEFINE_float("anchor_size", 0.0,
                     "Anchor side at level l: anchor_size * 2**l (times 3 scales and 3 "
                     "aspect ratios); 0: by stem (4 with the ImageNet stem, as COCO's "
                     "RetinaNet; 3 with the CIFAR stem, whose small objects 4 misses).")
  flags.DEFINE_integer("head_convs", 2, "Convolutions in each RetinaNet head (4 in the "
                       "paper's RetinaNet).")
  flags.DEFINE_integer("epochs", 12, "Fine-tuning epochs.")
  flags.DEFINE_integer("batch_size", 16, "Batch size.")
  flags.DEFINE_float("lr", 0.01, "Peak learning rate (SGD, momentum).")
  flags.DEFINE_integer("warmup_epochs", 1, "Linear warm-up epochs.")
  flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
  flags.DEFINE_float("weight_decay", 1e-4, "Coupled L2 weight decay.")
  flags.DEFINE_float("clipnorm", 10.0, "Global gradient-norm clip (0: off).")
  flags.DEFINE_integer("eval_every_epochs", 4, "mAP on the test split every N epochs.")
  flags_lib.define_lifecycle_flags(keep_checkpoints=2,
                                   seed_help="Seed of the heads and the data order.")


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.detect_from_flags(flag_values)
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
