r"""Export the encoder of a training workdir as a SavedModel.

    python export/export_encoder.py --workdir=runs/c10 --export_dir=runs/c10/export
    python -m corinfomax_tf.export --workdir=runs/c10 --export_dir=runs/c10/export

Writes runs/c10/export.steps/<step>/ and points the link runs/c10/export at it; the
export is reloaded and checked against the live encoder before the command returns.
See docs/export.md for the signatures.
"""

from absl import flags

from corinfomax_tf.cli import runner


def define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir to export from.")
  flags.DEFINE_string("export_dir", None, "Path of the export (a link to the newest step).")
  from corinfomax_tf import config
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_config_flags(config.ExportConfig)


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.export_from_flags(flag_values)
  runner.start_tensorflow()
  from corinfomax_tf.export import saved_model
  path, step = saved_model.export_workdir(cfg.workdir, cfg.export_dir, cfg.checkpoint,
                                          overwrite=cfg.overwrite, onnx=cfg.onnx,
                                          litert=cfg.litert, log=runner.log)
  for name, entry in saved_model.read_metadata(path).get("runtimes", {}).items():
    if "relative_difference" in entry:
      runner.log(f"{entry['file']}: {entry['runtime']} gives the SavedModel's features to "
                 f"{entry['relative_difference']:.2g} (tolerance {entry['tolerance']:g})")
  runner.log(f"Exported step {step} to {path}; {cfg.export_dir} -> it; reload check passed")
  runner.log(saved_model.files_line(path))


def run():
  runner.run(main, define_flags, required=[("workdir", "the training workdir"),
                                           ("export_dir", "where the export goes")])
