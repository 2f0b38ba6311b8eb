"""`python -m corinfomax_tf.benchmark`: see corinfomax_tf/cli/benchmark.py."""

if __name__ == "__main__":
  from corinfomax_tf.cli import benchmark
  benchmark.run()
