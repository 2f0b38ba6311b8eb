"""`python -m corinfomax_tf.finetune`: see corinfomax_tf/cli/finetune.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import finetune
  finetune.run()
