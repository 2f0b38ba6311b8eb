"""`python -m corinfomax_tf.embed`: see corinfomax_tf/cli/embed.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import embed
  embed.run()
