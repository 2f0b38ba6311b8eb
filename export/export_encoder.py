r"""Export the encoder of a training workdir as a SavedModel.

    python export/export_encoder.py --workdir=runs/c10 --export_dir=runs/c10/export

Writes runs/c10/export.steps/<step>/ and points the link runs/c10/export at it; the
export is reloaded and checked against the live encoder before the command returns.
See export/README.md for the signatures.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from corinfomax_tf import flags as flags_lib  # noqa: E402

flags.DEFINE_string("workdir", None, "Training workdir to export from.")
flags.DEFINE_string("export_dir", None, "Path of the export (a link to the newest step).")
flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default: the latest.")
flags.DEFINE_bool("overwrite", False, "Replace an existing export of the same step.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    flags_lib.exit_with_error(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir or not FLAGS.export_dir:
    flags_lib.exit_with_error("--workdir and --export_dir are required")
  import numpy as np
  import tensorflow as tf

  from corinfomax_tf import export_lib
  try:
    encoder, config, step = export_lib.restore_encoder(FLAGS.workdir, FLAGS.checkpoint)
    checkpoint = FLAGS.checkpoint or tf.train.latest_checkpoint(
        os.path.join(FLAGS.workdir, "checkpoints"))
    metadata = export_lib.metadata_for(encoder, config, step, checkpoint)
    path = export_lib.write_export(encoder, metadata, FLAGS.export_dir,
                                   overwrite=FLAGS.overwrite)
  except export_lib.ExportError as e:
    flags_lib.exit_with_error(str(e))
  # Prove the export reloads and computes what the live encoder computes.
  size = metadata["image_size"]
  images = np.random.RandomState(0).randint(0, 256, (3, size, size, 3)).astype(np.uint8)
  loaded = tf.saved_model.load(path)
  got = loaded.signatures["serving_default"](images=tf.constant(images))["features"]
  mean = np.array(metadata["normalization"]["mean"], np.float32)
  std = np.array(metadata["normalization"]["std"], np.float32)
  want = encoder((images.astype(np.float32) / 255.0 - mean) / std, training=False)
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
  print(f"Exported step {step} to {path}; {FLAGS.export_dir} -> it; reload check passed",
        flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=flags_lib.parse_flags)
