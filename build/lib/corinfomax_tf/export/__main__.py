"""`python -m corinfomax_tf.export`: see corinfomax_tf/cli/export.py."""

from corinfomax_tf.cli import export

export.run()
