r"""Search CorInfoMax's hyperparameters for your data: an Optuna study whose trials
are ordinary pretraining workdirs.

    python -m corinfomax_tf.sweep --flagfile=configs/sweep_digits.cfg
    corinfomax sweep --flagfile=configs/sweep_images.cfg --data_dir=/data/photos \
        --eval_dataset=folder --eval_data_dir=/data/labelled --workdir=runs/sweep

Every flag of `train` is fixed for all trials as given; `--search=NAME:KIND:...`
(repeated) names what varies. Results in --workdir: trials/<n>/, study.db, sweep.json,
best.cfg (`corinfomax train --flagfile=<workdir>/best.cfg`), PNG plots, and the HParams
dashboard (`tensorboard --logdir <workdir>`). Rerun the same command to continue; run
it on several hosts (shared --workdir and --storage) to share the study. See
docs/sweep.md.
"""

from absl import flags

from corinfomax_tf.cli import runner


def define_flags():
  from corinfomax_tf import config
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_flags()
  if "search" in flags.FLAGS:
    return
  flags.DEFINE_multi_string(
      "search", [], "A searched parameter, NAME:KIND:LOW:HIGH (KIND log, uniform, int, "
      "int_log) or NAME:choice:A,B,...; NAME is a train flag or projector_out (the "
      "projector's output size). Repeat for each parameter.")
  flags_lib.define_config_flags(config.SweepConfig)


def main(flag_values):
  import dataclasses

  from corinfomax_tf import config as config_lib
  from corinfomax_tf import flags as flags_lib
  own = {f.name: flag_values[f.name].value for f in dataclasses.fields(config_lib.SweepConfig)
         if f.name not in ("workdir", "search", "train")}
  cfg = config_lib.sweep_config(flags_lib.train_values(flag_values), flag_values.search,
                                **own)
  runner.start_tensorflow()   # after every check: a bad --search costs no TensorFlow
  from corinfomax_tf.tuning import sweep as sweep_lib
  sweep_lib.Sweep(cfg, log=runner.log).run()


def run():
  runner.run(main, define_flags)
