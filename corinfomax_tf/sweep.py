"""`python -m corinfomax_tf.sweep`: see corinfomax_tf/cli/sweep.py.

(`corinfomax_tf.sweep`, the attribute of the package, is the Python function
`corinfomax_tf.tuning.sweep.sweep`; this file is only the command's entry point.)
"""

if __name__ == "__main__":
  from corinfomax_tf.cli import sweep
  sweep.run()
