r"""Semi-supervised fine-tuning of an exported encoder on a fraction of the labels.

    python -m corinfomax_tf.finetune --encoder=runs/in1k/export \
        --flagfile=configs/semisup_imagenet1k_1pct.cfg
    python -m corinfomax_tf.finetune --encoder=runs/digits/export \
        --flagfile=configs/semisup_digits_10pct.cfg

See corinfomax_tf/downstream/finetune.py for the protocol. `--init=random` trains the
same network from a random initialisation with the same labels and settings: the
baseline the pretrained encoder has to beat. Re-running the command resumes.
"""

import dataclasses
import json

from absl import flags

from corinfomax_tf.cli import runner


def define_flags():
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_data_flags()
  flags_lib.define_encoder_flag("Encoder export directory (or training workdir).")
  flags.DEFINE_string("workdir", "", "Checkpoints, logs, label subset and results; "
                      "default: <encoder's parent>/finetune_<fraction>_<init>.")
  flags.DEFINE_enum("init", "pretrained", ["pretrained", "random"],
                    "Start from the export's weights, or from a random initialisation "
                    "of the same architecture (the from-scratch baseline).")
  flags.DEFINE_float("label_fraction", 0.1,
                     "Share of each class's training images that keep their label, in "
                     "(0, 1]; 1 with the tfds imagenet2012_subset sets.")
  flags.DEFINE_integer("subset_seed", 0, "Seed of the labelled subset.")
  flags.DEFINE_integer("epochs", 20, "Fine-tuning epochs.")
  flags.DEFINE_integer("batch_size", 256, "Batch size.")
  flags.DEFINE_float("backbone_lr", 0.005, "Learning rate of the encoder.")
  flags.DEFINE_float("head_lr", 10.0, "Learning rate of the linear head.")
  flags.DEFINE_list("lr_decay_epochs", ["12", "16"], "Epochs at which both rates decay.")
  flags.DEFINE_float("lr_decay_factor", 0.2, "Factor applied at each decay epoch.")
  flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
  flags.DEFINE_float("weight_decay", 0.0, "Coupled L2 weight decay.")
  flags.DEFINE_float("crop_min_scale", 0.08, "Random resized crop: smallest area share.")
  flags.DEFINE_float("hflip_prob", 0.5, "Horizontal flip probability.")
  flags.DEFINE_integer("eval_every_epochs", 5, "Test-split evaluation interval.")
  flags_lib.define_lifecycle_flags(keep_checkpoints=2)


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.finetune_from_flags(flag_values)
  from corinfomax_tf.data import datasets
  from corinfomax_tf.downstream import finetune
  from corinfomax_tf.export import saved_model
  from corinfomax_tf.models import factory
  encoder, metadata = saved_model.load_trainable_encoder(cfg.encoder)
  if cfg.init == "random":
    encoder = factory.random_encoder(metadata["architecture"], cfg.seed + 1)
  cfg = dataclasses.replace(cfg, data=datasets.resolve_image_size(cfg.data, metadata,
                                                                  runner.log))
  metadata = {**metadata, "image_size": cfg.data.image_size}
  source = datasets.load_eval_source(cfg.data, metadata["image_size"], log=runner.log)
  result = finetune.run_finetune(encoder, metadata, source, cfg, log=runner.log)
  runner.log(json.dumps({k: v for k, v in result.items() if k != "history"},
                        sort_keys=True))


def run():
  runner.run(main, define_flags, required=[("encoder", "an encoder export directory")])
