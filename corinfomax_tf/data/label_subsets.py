"""Class-balanced labelled subsets for semi-supervised fine-tuning.

ImageNet's standard 1% and 10% subsets (SimCLR's lists) come through
tensorflow-datasets (`--dataset=imagenet2012_subset/1pct`, whose train split *is* the
subset; use `--label_fraction=1`). For any other data set the subset is drawn here:
from every class, the same fraction of its training images (rounded), chosen by a
seed. The chosen indices (positions in the training split's fixed order) are written
to the workdir, so that the run can be repeated and a resumed run uses the same
subset. The evaluation split is never touched: the subset is disjoint from it.
"""

import hashlib
import json
import os

import numpy as np

from corinfomax_tf import atomic_files, errors

SUBSET_FILE = "label_subset.json"


def validate_fraction(fraction):
  if not 0.0 < fraction <= 1.0:
    raise errors.ConfigError(f"--label_fraction={fraction}: must be in (0, 1]")


def balanced_subset(labels, fraction, seed, num_classes):
  """Sorted indices: round(fraction * n_c) images of each class c, chosen by `seed`."""
  validate_fraction(fraction)
  labels = np.asarray(labels, np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.ConfigError(f"--train_split: labels in [{labels.min()}, {labels.max()}] do not "
                      f"fit {num_classes} classes")
  rng = np.random.RandomState(seed)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    count = int(np.floor(fraction * len(members) + 0.5))
    if count == 0:
      raise errors.ConfigError(
          f"--label_fraction={fraction}: leaves class {c} with no example (it has "
          f"{len(members)} training images); raise the fraction")
    chosen.append(rng.permutation(members)[:count])
  return np.sort(np.concatenate(chosen))


def _digest(labels):
  return hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()[:16]


def subset_for_workdir(workdir, labels, fraction, seed, num_classes):
  """The subset of this run: drawn and written on the first run, re-read on resume.

  A workdir holding a subset drawn with another fraction or seed, or from another
  training split (its label digest differs), is refused rather than silently mixed.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SUBSET_FILE)
  digest = _digest(labels)
  if os.path.exists(path):
    with open(path) as fh:
      saved = json.load(fh)
    for key, value in (("fraction", fraction), ("seed", seed), ("labels_digest", digest)):
      if saved.get(key) != value:
        flag = {"fraction": "--label_fraction", "seed": "--subset_seed",
                "labels_digest": "--dataset/--train_split"}[key]
        raise errors.ConfigError(f"{flag}: the workdir {workdir!r} holds a label subset drawn "
                          f"with {key}={saved.get(key)} (now {value}); use a new "
                          "--workdir or the same value")
    return np.asarray(saved["indices"], np.int64)
  indices = balanced_subset(labels, fraction, seed, num_classes)
  per_class = np.bincount(np.asarray(labels)[indices], minlength=num_classes)
  record = dict(fraction=fraction, seed=seed, labels_digest=digest,
                num_train=int(len(labels)), num_labelled=int(len(indices)),
                per_class=per_class.tolist(), indices=indices.tolist())
  atomic_files.write_json_atomic(path, record)
  return indices
