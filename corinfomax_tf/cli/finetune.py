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
  from corinfomax_tf import config
  flags_lib.define_config_flags(config.FinetuneConfig)


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.finetune_from_flags(flag_values)
  runner.start_tensorflow()
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
