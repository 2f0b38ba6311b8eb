r"""Export the encoder of a training workdir as a SavedModel (corinfomax_tf/cli/export.py).

    python export/export_encoder.py --workdir=runs/c10 --export_dir=runs/c10/export

The same command as `python -m corinfomax_tf.export`, kept where the README has always
pointed. Run from a checkout, the package is found next to this folder.
"""

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from corinfomax_tf.cli import export
  export.run()
