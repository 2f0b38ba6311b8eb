r"""Export the encoder of a training workdir (corinfomax_tf/cli/export.py).

    python export/export_encoder.py --workdir=runs/c10 --export_dir=runs/c10/export

The same command as `corinfomax export` and `python -m corinfomax_tf.export`, kept
where earlier releases pointed; it needs the package installed (`pip install .`).
"""

if __name__ == "__main__":
  from corinfomax_tf.cli import export
  export.run()
