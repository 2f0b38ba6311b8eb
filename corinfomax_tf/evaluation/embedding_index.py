"""The embeddings of a data set in a workdir, reused while the encoder and the images
are the same, and queried for each image's nearest neighbours (the `embed` command).

"The same" is by content: the digest of the encoder's weights and of the image files
(names, sizes, modification times), never by path. `embed_or_reuse` writes the arrays
(embedding.ARRAYS_FILE), the Projector view and SETTINGS_FILE, or reads them back;
`query` writes NEIGHBOURS_FILE.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from corinfomax_tf import config as config_lib
from corinfomax_tf import errors
from corinfomax_tf import fingerprints
from corinfomax_tf.data import augment
from corinfomax_tf.data import datasets
from corinfomax_tf.data import image_folder
from corinfomax_tf.evaluation import embedding

NEIGHBOURS_FILE = "neighbours.json"
SETTINGS_FILE = "embed_config.json"


def load_split(cfg, size, log=print):
  """(dataset, count, source) of the split to embed, its image folders scanned."""
  data = dataclasses.replace(cfg.data, image_size=size)
  split = datasets.load_split(data.dataset, cfg.split, **data.source_kwargs())
  for scan in split[2].scans:
    log(scan.summary())
  return split


def settings(cfg, encoder, size, split):
  """What the arrays are a function of: the encoder's weights (not its path, which may
  point at another step later) and the images (an image tree's files as they are now)."""
  result = config_lib.resume_settings(config_lib.as_dict(cfg), cfg.ARRAY_KEYS)
  result.update(encoder_weights=encoder.identity["weights"], image_size=size,
                images=split[1])
  if split[2].scans:
    result["files"] = fingerprints.files_digest(split[2].scans)
  return result


def embed_or_reuse(cfg, encoder, size, split, workdir, log=print):
  """The arrays of `split` in `workdir`: read back where SETTINGS_FILE says they are of
  this encoder and these images, else computed and written (the settings last)."""
  wanted = settings(cfg, encoder, size, split)
  if (workdir.read_json(SETTINGS_FILE) == wanted
      and os.path.isfile(workdir.join(embedding.ARRAYS_FILE))):
    arrays = load_arrays(workdir)
    log(f"Reusing the {len(arrays['features'])} embeddings in {workdir.path}")
    return arrays
  if os.path.exists(workdir.join(SETTINGS_FILE)):  # what the arrays are of is moot
    os.remove(workdir.join(SETTINGS_FILE))
  arrays = compute(cfg, split, size, encoder, workdir, log)
  workdir.write_json(SETTINGS_FILE, wanted)
  return arrays


def compute(cfg, split, size, encoder, workdir, log=print):
  """Embeds the split and writes the arrays and the Projector view; returns arrays."""
  data = cfg.data
  ds, count, source = split
  if cfg.max_images:
    ds, count = ds.take(cfg.max_images), min(count, cfg.max_images)
  thumbnail = embedding.thumbnail_size(count, size) if cfg.sprite else 0
  if cfg.sprite and not thumbnail:
    log(f"No sprite: {count} thumbnails do not fit the Projector's "
        f"{embedding.MAX_SPRITE_PIXELS}-pixel sprite (--max_images limits them)")
  batches = datasets.eval_dataset(ds, batch_size=cfg.batch_size, image_size=size,
                                  mean=(0.0,) * 3, std=(1.0,) * 3)
  arrays = embedding.embed(encoder, batches, thumbnail)
  if arrays is None:
    raise errors.DataError(f"--dataset={data.dataset}: no image of --split={cfg.split} "
                           "could be decoded")
  labels = arrays["labels"] if source.labelled else None
  has_paths = bool(source.scans)
  lines = embedding.metadata_lines(len(arrays["features"]), labels, source.class_names,
                                   arrays["paths"] if has_paths else None)
  arrays["class_names"] = np.asarray(source.class_names, str)
  tmp = workdir.join(embedding.ARRAYS_FILE + ".tmp.npz")
  np.savez(tmp, **{key: arrays[key] for key in
                   ("features", "labels", "paths", "class_names")})
  os.replace(tmp, workdir.join(embedding.ARRAYS_FILE))
  sprite = embedding.sprite(arrays["thumbnails"]) if thumbnail else None
  embedding.write_projector(workdir.path, arrays["features"], lines, sprite, thumbnail)
  log(f"Embedded {len(arrays['features'])} images of {data.dataset} "
      f"({'all' if data.dataset == 'images' else cfg.split}) to "
      f"{arrays['features'].shape[1]}-d features in {workdir.path}; view them with "
      f"`tensorboard --logdir {workdir.path}` (Projector tab)")
  return arrays


def load_arrays(workdir):
  with np.load(workdir.join(embedding.ARRAYS_FILE)) as saved:
    return {key: saved[key] for key in saved.files}


def query(cfg, encoder, size, arrays, workdir, log=print):
  """Each --query image's k nearest images of the set: logged and written."""
  images = []
  for path in cfg.query:
    reason, detail = image_folder.check_file(path, "full")
    if reason:
      raise errors.DataError(f"--query: {path!r} is not a usable image "
                             f"({reason.replace('_', ' ')}: {detail})")
    images.append(_eval_image(path, size))
  feats = np.asarray(encoder(np.stack(images), training=False))
  index, sim = embedding.nearest(arrays["features"], feats, cfg.k)
  names, labels, paths = arrays["class_names"], arrays["labels"], arrays["paths"]
  result = []
  for path, rows, sims in zip(cfg.query, index, sim):
    neighbours = [dict(index=int(i), similarity=float(s), label=int(labels[i]),
                       **({"class": str(names[labels[i]])}
                          if 0 <= labels[i] < len(names) else {}),
                       path=str(paths[i])) for i, s in zip(rows, sims)]
    result.append(dict(query=os.path.abspath(path), neighbours=neighbours))
    log(f"{path}: " + "; ".join(
        f"#{n['index']} {n['similarity']:.3f}" + (f" {n['class']}" if "class" in n else "")
        + (f" {n['path']}" if n["path"] else "") for n in neighbours))
  workdir.write_json(NEIGHBOURS_FILE, result)
  return result


def _eval_image(path, size):
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  return augment.eval_view(augment.to_float(image), size, (0.0,) * 3, (1.0,) * 3).numpy()
