r"""Linear evaluation of a frozen encoder, the paper's protocol.

    python -m corinfomax_tf.linear_eval --flagfile=configs/linear_cifar10.cfg \
        --encoder=runs/c10/export

The encoder is an export (export/export_encoder.py) or a training workdir; see
corinfomax_tf/evaluation/linear.py for the protocol. --workdir (default:
<encoder's parent>/linear_eval) is the command's workdir: locked while it runs,
checkpoints after every epoch (rerunning resumes exactly), TensorBoard logs under
train/ and eval/, and linear_eval.json.
"""

import dataclasses
import json

from absl import flags

from corinfomax_tf.cli import runner


def define_flags():
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_data_flags()
  flags_lib.define_encoder_flag("Encoder export directory or training workdir.")
  flags.DEFINE_string("workdir", "",
                      "The workdir: checkpoints, logs and linear_eval.json; default: "
                      "<encoder's parent>/linear_eval.")
  from corinfomax_tf import config
  flags_lib.define_config_flags(config.LinearEvalConfig)


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.linear_eval_from_flags(flag_values)
  runner.start_tensorflow()
  from corinfomax_tf.data import datasets
  from corinfomax_tf.evaluation import linear
  from corinfomax_tf.export import saved_model
  encoder = saved_model.load_encoder(cfg.encoder)
  cfg = dataclasses.replace(cfg, data=datasets.resolve_image_size(cfg.data, encoder.metadata,
                                                                  runner.log))
  source = datasets.load_eval_source(cfg.data, encoder.image_size, cfg.num_classes,
                                     log=runner.log)
  result = linear.run_linear_eval(encoder, source, cfg, log=runner.log)
  runner.log(json.dumps({k: v for k, v in result.items() if k != "history"},
                        sort_keys=True))


def run():
  runner.run(main, define_flags, required=[
      ("encoder", "an export directory or a training workdir")],
      renamed=runner.OUTPUT_DIR_RENAMED)
