"""`python -m corinfomax_tf.detect`: see corinfomax_tf/cli/detect.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import detect
  detect.run()
