r"""kNN evaluation of a frozen encoder (cosine similarity, temperature-weighted votes).

    python -m corinfomax_tf.knn_eval --encoder=runs/digits/export --dataset=digits --image_size=16

Features of the training split (resize + centre crop, no augmentation) vote for the
classes of the test images: the k most similar vote with weight exp(sim / T), as in
Wu et al. (2018) and the SSL literature (k = 20 and 200, T = 0.07 by default). The
result goes to <output_dir>/knn_eval.json.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from corinfomax_tf import flags as flags_lib  # noqa: E402
from corinfomax_tf import linear_eval  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  flags_lib.define_data_flags()
  flags.DEFINE_string("encoder", None, "Encoder export directory or training workdir.")
  flags.DEFINE_string("output_dir", "", "Where results go; default: <encoder's parent>/knn_eval.")
  flags.DEFINE_integer("num_classes", 0, "Expected class count (0: the data set's).")
  flags.DEFINE_list("k", ["20", "200"], "Neighbour counts.")
  flags.DEFINE_float("temperature", 0.07, "Vote temperature.")


def run_knn_eval(encoder, source, *, image_size, ks=(20, 200), temperature=0.07):
  from corinfomax_tf import evaluation
  train_x, train_y = linear_eval.features_of(
      encoder, linear_eval.eval_images(source.train, image_size))
  test_x, test_y = linear_eval.features_of(
      encoder, linear_eval.eval_images(source.test, image_size))
  linear_eval.check_labels(train_y, source.num_classes, "train_split")
  linear_eval.check_labels(test_y, source.num_classes, "test_split")
  result = evaluation.knn_evaluate(train_x, train_y, test_x, test_y, source.num_classes,
                                   ks=ks, temperature=temperature)
  return {**result, "temperature": temperature, "num_train": source.num_train,
          "num_test": source.num_test, "num_classes": source.num_classes}


def main(argv):
  flags_lib.begin_command(argv, FLAGS, encoder_help="an export directory or a training workdir")
  try:
    ks = tuple(int(k) for k in FLAGS.k)
    assert ks and min(ks) >= 1
  except (ValueError, AssertionError):
    flags_lib.exit_with_error(f"--k={','.join(FLAGS.k)}: must be positive integers")
  from corinfomax_tf import data as data_lib
  from corinfomax_tf import export_lib
  try:
    encoder = export_lib.load_encoder(FLAGS.encoder)
    source = linear_eval.load_source_for(encoder.metadata, FLAGS)
    result = run_knn_eval(encoder, source, image_size=FLAGS.image_size, ks=ks,
                          temperature=FLAGS.temperature)
  except (linear_eval.EvalError, export_lib.ExportError, data_lib.DataError) as e:
    flags_lib.exit_with_error(str(e))
  linear_eval.write_result(linear_eval.output_dir_for(FLAGS, "knn_eval"), "knn_eval",
                           result, FLAGS, encoder)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=flags_lib.parse_flags)
