r"""Pretrain an encoder with CorInfoMax, then probe it.

    python -m corinfomax_tf.train --flagfile=configs/digits.cfg
    python -m corinfomax_tf.train --flagfile=configs/cifar10.cfg --workdir=runs/c10

The workdir receives checkpoints (encoder, projector, loss state, optimizer and step),
flags.cfg (the resolved flags: rerun with --flagfile=<workdir>/flags.cfg),
config.json, TensorBoard logs under train/ and eval/, and summary.json. Running the
same command again resumes from the latest intact checkpoint; a finished run is not
trained again. `--backend=jax` (or KERAS_BACKEND=jax) trains on Keras' JAX backend
(docs/backends.md).
"""

import os

from corinfomax_tf.cli import runner


def main(flag_values):
  from corinfomax_tf import config as config_lib
  from corinfomax_tf import flags as flags_lib
  cfg = config_lib.from_flags(flag_values)
  # Keras reads its backend at its first import, JAX its devices at its start: both
  # from the validated config, before either is imported.
  os.environ["KERAS_BACKEND"] = cfg.train.backend
  flag_values.backend = cfg.train.backend   # flags.cfg reruns on the same backend
  if cfg.train.backend == "jax" and cfg.train.num_cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                               f"platform_device_count={cfg.train.num_cpu_devices}").strip()
  # TensorFlow starts only now, after validation: a bad flag costs no TensorFlow
  # start-up, and logical CPU devices can still be configured.
  runner.start_tensorflow()
  from corinfomax_tf.training import pretraining
  pretraining.PretrainingJob(cfg, flags_lib.resolved_flagfile(flag_values),
                             log=runner.log).run()


def run():
  from corinfomax_tf import flags as flags_lib
  runner.run(main, flags_lib.define_flags, backends=("tensorflow", "jax"))
