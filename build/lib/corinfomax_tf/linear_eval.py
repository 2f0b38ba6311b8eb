"""`python -m corinfomax_tf.linear_eval`: see corinfomax_tf/cli/linear_eval.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import linear_eval
  linear_eval.run()
