"""`corinfomax <command> [--flags]`: the console script installed with the package.

    corinfomax train --flagfile=configs/digits.cfg
    corinfomax export --workdir=runs/digits --export_dir=runs/digits/export
    corinfomax linear-eval --encoder=runs/digits/export --dataset=digits

Each subcommand is the same command as `python -m corinfomax_tf.<module>` (same flags,
same output, same exit statuses); `corinfomax <command> --help` lists its flags.
"""

import importlib
import sys

# Subcommand -> (module under corinfomax_tf.cli, one line of what it does).
COMMANDS = {
    "train": ("train", "pretrain an encoder with CorInfoMax, then probe it"),
    "export": ("export", "export a workdir's encoder (SavedModel + keras-hub preset)"),
    "linear-eval": ("linear_eval", "linear evaluation of a frozen encoder"),
    "knn-eval": ("knn_eval", "k-nearest-neighbour evaluation of a frozen encoder"),
    "finetune": ("finetune", "semi-supervised fine-tuning on a labelled subset"),
    "detect": ("detect", "object detection (RetinaNet) on the encoder's feature pyramid"),
    "embed": ("embed", "embeddings, a TensorBoard projector and nearest neighbours"),
    "sweep": ("sweep", "a hyperparameter sweep (Optuna) scored on held-out data"),
    "benchmark": ("benchmark", "training-step and input-pipeline throughput"),
    "data-service": ("data_service", "a tf.data service dispatcher or worker"),
}


def usage():
  lines = ["usage: corinfomax <command> [--flag=value ...]", "", "commands:"]
  lines += [f"  {name:<13} {what}" for name, (_, what) in COMMANDS.items()]
  lines += ["", "`corinfomax <command> --help` lists the command's flags; "
            "`--flagfile=configs/<name>.cfg` names a flagfile shipped with the package."]
  return "\n".join(lines)


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name = argv[1]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)} "
          "(corinfomax --help)", file=sys.stderr)
    return 2
  module = importlib.import_module(f"corinfomax_tf.cli.{COMMANDS[name][0]}")
  sys.argv = [f"corinfomax {name}", *argv[2:]]
  module.run()
  return 0


if __name__ == "__main__":
  sys.exit(main())
