"""`python -m corinfomax_tf.data_service`: see corinfomax_tf/cli/data_service.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import data_service
  data_service.run()
