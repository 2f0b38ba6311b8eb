"""`python -m corinfomax_tf.train`: see corinfomax_tf/cli/train.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import train
  train.run()
