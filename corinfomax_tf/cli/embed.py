r"""Embeddings of a data set through a frozen encoder, to look at and to query.

    python -m corinfomax_tf.embed --encoder=runs/digits/export --dataset=digits \
        --split=test --workdir=runs/digits/embed
    tensorboard --logdir runs/digits/embed          # the Projector tab
    python -m corinfomax_tf.embed --encoder=runs/digits/export --dataset=digits \
        --split=test --workdir=runs/digits/embed --query=my_digit.png --k=5

Writes to --workdir: embeddings.npz (features, labels, paths; labels -1 for
unlabeled images, paths "" where the set has none), a TensorBoard Projector view
(projector_config.pbtxt, the embedding checkpoint, metadata.tsv, sprite.png of
thumbnails) and, with --query, neighbours.json: each query image's --k most similar
images of the set (cosine similarity of pooled features). A rerun with the same
encoder and data reuses the embeddings, so queries cost one image each: "the same"
by content, the digest of the encoder's weights and of the image files (names, sizes,
modification times), never by path.
"""

import json
import os

from absl import flags

from corinfomax_tf.cli import runner

NEIGHBOURS_FILE = "neighbours.json"
SETTINGS_FILE = "embed_config.json"


def define_flags():
  from corinfomax_tf import flags as flags_lib
  flags_lib.define_data_flags()
  flags_lib.define_encoder_flag("Encoder export directory or training workdir.")
  flags.DEFINE_string("workdir", "",
                      "Where the arrays and the Projector view go; default: <encoder's "
                      "parent>/embed_<dataset>_<split>.")
  from corinfomax_tf import config
  flags_lib.define_config_flags(config.EmbedConfig)


def _image_size(cfg, encoder):
  """The encoder's training size, or --image_size with one line where it differs."""
  from corinfomax_tf.data import datasets
  return datasets.resolve_image_size(cfg.data, encoder.metadata, runner.log).image_size


def load_split(cfg, size):
  """(dataset, count, source) of the split to embed, its image folders scanned."""
  import dataclasses

  from corinfomax_tf.data import datasets
  data = dataclasses.replace(cfg.data, image_size=size)
  split = datasets.load_split(data.dataset, cfg.split, **data.source_kwargs())
  for scan in split[2].scans:
    runner.log(scan.summary())
  return split


def compute(cfg, split, size, encoder, workdir):
  """Embeds the split and writes the arrays and the Projector view; returns arrays."""
  import numpy as np

  from corinfomax_tf.data import datasets
  from corinfomax_tf.evaluation import embedding
  data = cfg.data
  ds, count, source = split
  if cfg.max_images:
    ds, count = ds.take(cfg.max_images), min(count, cfg.max_images)
  thumbnail = embedding.thumbnail_size(count, size) if cfg.sprite else 0
  if cfg.sprite and not thumbnail:
    runner.log(f"No sprite: {count} thumbnails do not fit the Projector's "
               f"{embedding.MAX_SPRITE_PIXELS}-pixel sprite (--max_images limits them)")
  batches = datasets.eval_dataset(ds, batch_size=cfg.batch_size, image_size=size,
                                  mean=(0.0,) * 3, std=(1.0,) * 3)
  arrays = embedding.embed(encoder, batches, thumbnail)
  if arrays is None:
    from corinfomax_tf import errors
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
  runner.log(f"Embedded {len(arrays['features'])} images of {data.dataset} "
             f"({'all' if data.dataset == 'images' else cfg.split}) to "
             f"{arrays['features'].shape[1]}-d features in {workdir.path}; view them with "
             f"`tensorboard --logdir {workdir.path}` (Projector tab)")
  return arrays


def load_arrays(workdir):
  import numpy as np

  from corinfomax_tf.evaluation import embedding
  with np.load(workdir.join(embedding.ARRAYS_FILE)) as saved:
    return {key: saved[key] for key in saved.files}


def query(cfg, encoder, size, arrays, workdir):
  """Each --query image's k nearest images of the set: printed and written."""
  import numpy as np

  from corinfomax_tf.data import augment
  from corinfomax_tf.data import image_folder
  from corinfomax_tf.evaluation import embedding
  from corinfomax_tf import errors
  images = []
  for path in cfg.query:
    reason, detail = image_folder.check_file(path, "full")
    if reason:
      raise errors.DataError(f"--query: {path!r} is not a usable image "
                             f"({reason.replace('_', ' ')}: {detail})")
    images.append(_eval_image(path, size, augment))
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
    runner.log(f"{path}: " + "; ".join(
        f"#{n['index']} {n['similarity']:.3f}" + (f" {n['class']}" if "class" in n else "")
        + (f" {n['path']}" if n["path"] else "") for n in neighbours))
  workdir.write_json(NEIGHBOURS_FILE, result)
  return result


def _eval_image(path, size, augment):
  import tensorflow as tf
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  return augment.eval_view(augment.to_float(image), size, (0.0,) * 3, (1.0,) * 3).numpy()


def main(flag_values):
  from corinfomax_tf import config as config_lib
  cfg = config_lib.embed_from_flags(flag_values)
  runner.start_tensorflow()   # after the config's checks: a bad flag costs no TensorFlow
  from corinfomax_tf import fingerprints
  from corinfomax_tf.evaluation import embedding
  from corinfomax_tf.export import saved_model
  from corinfomax_tf.training import workdir as workdir_lib
  encoder = saved_model.load_encoder(cfg.encoder, runtime=cfg.runtime)
  size = _image_size(cfg, encoder)
  split = load_split(cfg, size)
  # What the arrays are a function of: the encoder's weights (not its path, which may
  # point at another step later) and the images (an image tree's files as they are now).
  settings = config_lib.resume_settings(config_lib.as_dict(cfg), cfg.ARRAY_KEYS)
  settings.update(encoder_weights=encoder.identity["weights"], image_size=size,
                  images=split[1])
  if split[2].scans:
    settings["files"] = fingerprints.files_digest(split[2].scans)
  with workdir_lib.Workdir(cfg.workdir, flag="--workdir", command="corinfomax_tf.embed",
                           log=runner.log) as workdir:
    if (workdir.read_json(SETTINGS_FILE) == settings
        and os.path.isfile(workdir.join(embedding.ARRAYS_FILE))):
      arrays = load_arrays(workdir)
      runner.log(f"Reusing the {len(arrays['features'])} embeddings in {workdir.path}")
    else:
      if os.path.exists(workdir.join(SETTINGS_FILE)):  # what the arrays are of is moot
        os.remove(workdir.join(SETTINGS_FILE))
      arrays = compute(cfg, split, size, encoder, workdir)
      workdir.write_json(SETTINGS_FILE, settings)
    if cfg.query:
      query(cfg, encoder, size, arrays, workdir)
  runner.log(json.dumps(dict(images=int(len(arrays["features"])),
                             feature_dim=int(arrays["features"].shape[1]),
                             workdir=workdir.path), sort_keys=True))


def run():
  runner.run(main, define_flags, required=[
      ("encoder", "an export directory or a training workdir")],
      renamed=runner.OUTPUT_DIR_RENAMED)
