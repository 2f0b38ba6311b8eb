r"""Embeddings of a data set through a frozen encoder, to look at and to query.

    python -m corinfomax_tf.embed --encoder=runs/digits/export --dataset=digits \
        --split=test --workdir=runs/digits/embed
    tensorboard --logdir runs/digits/embed          # the Projector tab
    python -m corinfomax_tf.embed --encoder=runs/digits/export --dataset=digits \
        --split=test --workdir=runs/digits/embed --query=my_digit.png --k=5

Writes to --workdir: embeddings.npz (features, labels, paths; labels -1 for
unlabeled images, paths "" where the set has none), a TensorBoard Projector view
(projector_config.pbtxt, the embedding checkpoint, metadata.tsv, sprite.png of
thumbnails) and, with --query, neighbours.json: each query image's --k most similar
images of the set (cosine similarity of pooled features). A rerun with the same
encoder and data reuses the embeddings, so queries cost one image each: "the same"
by content, the digest of the encoder's weights and of the image files (names, sizes,
modification times), never by path. See corinfomax_tf/evaluation/embedding_index.py.
"""

import json

from absl import flags

from corinfomax_tf.cli import runner


def define_flags():
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_data_flags()
  flags_lib.define_encoder_flag("Encoder export directory or training workdir.")
  flags.DEFINE_string("workdir", "",
                      "Where the arrays and the Projector view go; default: <encoder's "
                      "parent>/embed_<dataset>_<split>.")
  from corinfomax_tf import config
  flags_lib.define_config_flags(config.EmbedConfig)


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.embed_from_flags(flag_values)
  runner.start_tensorflow()   # after the config's checks: a bad flag costs no TensorFlow
  from corinfomax_tf.data import datasets
  from corinfomax_tf.evaluation import embedding_index
  from corinfomax_tf.export import saved_model
  from corinfomax_tf.training import workdir as workdir_lib
  encoder = saved_model.load_encoder(cfg.encoder, runtime=cfg.runtime)
  # The encoder's training size, or --image_size with one line where it differs.
  size = datasets.resolve_image_size(cfg.data, encoder.metadata, runner.log).image_size
  split = embedding_index.load_split(cfg, size, runner.log)
  with workdir_lib.Workdir(cfg.workdir, flag="--workdir", command="corinfomax_tf.embed",
                           log=runner.log) as workdir:
    arrays = embedding_index.embed_or_reuse(cfg, encoder, size, split, workdir, runner.log)
    if cfg.query:
      embedding_index.query(cfg, encoder, size, arrays, workdir, runner.log)
  runner.log(json.dumps(dict(images=int(len(arrays["features"])),
                             feature_dim=int(arrays["features"].shape[1]),
                             workdir=workdir.path), sort_keys=True))


def run():
  runner.run(main, define_flags, required=[
      ("encoder", "an export directory or a training workdir")],
      renamed=runner.OUTPUT_DIR_RENAMED)
