r"""kNN evaluation of a frozen encoder (cosine similarity, temperature-weighted votes).

    python -m corinfomax_tf.knn_eval --encoder=runs/digits/export --dataset=digits --image_size=16

See corinfomax_tf/evaluation/knn.py. The result goes to <workdir>/knn_eval.json
(default: <encoder's parent>/knn_eval).
"""

import dataclasses
import json

from absl import flags

from corinfomax_tf.cli import runner


def define_flags():
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_data_flags()
  flags_lib.define_encoder_flag("Encoder export directory or training workdir.")
  flags.DEFINE_string("workdir", "", "Where results go; default: <encoder's parent>/knn_eval.")
  from corinfomax_tf import config
  flags_lib.define_config_flags(config.KnnEvalConfig)


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.knn_eval_from_flags(flag_values)
  runner.start_tensorflow()
  from corinfomax_tf.data import datasets
  from corinfomax_tf.evaluation import knn
  from corinfomax_tf.export import saved_model
  from corinfomax_tf.training import workdir as workdir_lib
  encoder = saved_model.load_encoder(cfg.encoder, runtime=cfg.runtime)
  cfg = dataclasses.replace(cfg, data=datasets.resolve_image_size(cfg.data, encoder.metadata,
                                                                  runner.log))
  source = datasets.load_eval_source(cfg.data, encoder.image_size, cfg.num_classes,
                                     log=runner.log)
  if cfg.validation_fraction:
    source, _ = datasets.holdout(source, cfg.validation_fraction, cfg.validation_seed)
  with workdir_lib.Workdir(cfg.workdir, flag="--workdir", command="corinfomax_tf.knn_eval",
                           log=runner.log) as workdir:
    result = knn.run_knn_eval(encoder, source, image_size=cfg.data.image_size, ks=cfg.k,
                              temperature=cfg.temperature)
    result.update(saved_model.provenance(cfg.encoder, encoder.metadata, cfg.data.dataset,
                                         encoder.identity), runtime=cfg.runtime)
    if cfg.validation_fraction:
      result.update(validation_fraction=cfg.validation_fraction,
                    validation_seed=cfg.validation_seed)
    workdir.write_json(knn.RESULT_FILE, result)
  runner.log(json.dumps(result, sort_keys=True))


def run():
  runner.run(main, define_flags, required=[
      ("encoder", "an export directory or a training workdir")],
      renamed=runner.OUTPUT_DIR_RENAMED)
