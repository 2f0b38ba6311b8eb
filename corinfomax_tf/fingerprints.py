"""What a cached or resumed result is keyed by: digests of content, never paths.

    weights_digest(encoder.variables)   # the encoder, whatever path it came from
    files_digest(scans)                 # the image files a tree or list holds now

A result computed from an encoder (linear evaluation, embeddings, fine-tuning,
detection) records the digest of the encoder's weights, and a rerun whose encoder
has other weights (an export link moved to a newer step, a workdir trained on) is
not answered from the old result. Embeddings of an image tree record the digest of
its files (relative path, size, modification time), so files added, deleted or
replaced are noticed.
"""

import hashlib
import os

import numpy as np


def weights_digest(variables):
  """sha256 (hex, 16 characters) of the variables' shapes, dtypes and values, in order."""
  digest = hashlib.sha256()
  for variable in variables:
    value = np.ascontiguousarray(np.asarray(variable))
    digest.update(f"{value.dtype.str}{value.shape}".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def file_digest(path):
  """sha256 (hex, 16 characters) of one file's bytes (an exported encoder.onnx)."""
  digest = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


def files_digest(scans, stat=True):
  """sha256 (hex, 16 characters) of the scanned files: each file's path relative to
  its scan's root and its label, with `stat` also its size and modification time."""
  digest = hashlib.sha256()
  for scan in scans:
    for path, label in zip(scan.paths, scan.labels):
      line = f"{os.path.relpath(path, scan.root)}\t{label}"
      if stat:
        try:
          info = os.stat(path)
          line += f"\t{info.st_size}\t{info.st_mtime_ns}"
        except OSError:
          line += "\tmissing"
      digest.update((line + "\n").encode())
  return digest.hexdigest()[:16]
