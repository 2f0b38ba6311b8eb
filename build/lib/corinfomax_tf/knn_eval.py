"""`python -m corinfomax_tf.knn_eval`: see corinfomax_tf/cli/knn_eval.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import knn_eval
  knn_eval.run()
