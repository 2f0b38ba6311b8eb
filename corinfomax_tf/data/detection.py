"""Detection data: a generated set, COCO-format JSON, and COCO through tfds.

Every source gives images resized to `image_size` x `image_size` (uint8) and, per
image, up to `max_boxes` boxes as float32 [x_min, y_min, x_max, y_max] in pixels of
the resized image with int32 class labels, padded with boxes of -1 and labels of -1
(keras-hub's convention for "no box").

* "generated": the project's own offline set. Handwritten digits (scikit-learn's
  bundled set; training images from its training split, test images from its test
  split, so the two never share an object) are resized to random sizes, coloured, and
  pasted on smooth random backgrounds without overlapping; their tight boxes and digit
  classes are the ground truth. A function of the seed alone.
* "coco_json": a user's COCO-format annotation file and image directory. Every
  annotation is checked before training: a box outside its image, of zero area or not
  finite, a category id missing from "categories", a malformed entry or an image file
  that does not exist is an error naming the annotation and the file. Boxes beyond
  --max_boxes in an image are left out, counted (`DetectionSource.dropped_boxes`),
  logged and recorded in detect.json.
* any tensorflow-datasets detection set with image/objects/bbox/label features
  (coco/2017), read from --tfds_data_dir without downloading.
"""

import dataclasses
import json
import math
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from corinfomax_tf import errors
from corinfomax_tf.data import datasets as data_lib

GENERATED = "generated"
COCO_JSON = "coco_json"


@dataclasses.dataclass(frozen=True)
class DetectionSource:
  name: str
  train: tf.data.Dataset   # (uint8 image (S, S, 3), {"boxes": (M, 4), "labels": (M,)})
  test: tf.data.Dataset
  num_train: int
  num_test: int
  class_names: tuple
  # Boxes beyond --max_boxes left out: {"train": {"boxes": n, "images": m,
  # "most_in_one_image": k}, "test": {...}} (COCO JSON; empty where none were).
  dropped_boxes: dict = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self):
    return len(self.class_names)


def pad_boxes(boxes, labels, max_boxes):
  """(M, 4) float32 and (M,) int32 arrays, padded with -1 (extra boxes dropped)."""
  out_b = np.full((max_boxes, 4), -1.0, np.float32)
  out_l = np.full((max_boxes,), -1, np.int32)
  n = min(len(labels), max_boxes)
  out_b[:n] = np.asarray(boxes, np.float32).reshape(-1, 4)[:n]
  out_l[:n] = np.asarray(labels, np.int32)[:n]
  return out_b, out_l


# ----------------------------------------------------------------------------
# The generated set.
# ----------------------------------------------------------------------------


def _iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _background(rs, size):
  coarse = rs.uniform(0.0, 0.45, (4, 4, 3)).astype(np.float32)
  smooth = tf.image.resize(coarse[None], (size, size), method="bicubic")[0].numpy()
  return np.clip(smooth + rs.normal(0, 0.03, (size, size, 3)), 0, 1)


def generate_detection_arrays(num_images, *, image_size=48, split="train", seed=0,
                              max_objects=3, min_size=12, max_size=22, max_boxes=4):
  """(images uint8 (N, S, S, 3), boxes (N, max_boxes, 4), labels (N, max_boxes))."""
  (x_tr, y_tr), (x_te, y_te) = data_lib.digits_arrays(8)
  glyphs, classes = (x_tr, y_tr) if split == "train" else (x_te, y_te)
  rs = np.random.RandomState(seed * 2 + (split != "train"))
  images = np.zeros((num_images, image_size, image_size, 3), np.uint8)
  boxes = np.zeros((num_images, max_boxes, 4), np.float32)
  labels = np.zeros((num_images, max_boxes), np.int32)
  for n in range(num_images):
    canvas = _background(rs, image_size)
    placed, placed_labels = [], []
    for _ in range(rs.randint(1, max_objects + 1)):
      index = rs.randint(len(classes))
      size = rs.randint(min_size, max_size + 1)
      glyph = np.asarray(Image.fromarray(glyphs[index][..., 0]).resize(
          (size, size), Image.BILINEAR), np.float32) / 255.0
      rows, cols = np.nonzero(glyph > 0.25)
      for _attempt in range(20):
        x0, y0 = rs.randint(0, image_size - size + 1, size=2)
        box = [x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1]
        if all(_iou(box, other) < 0.05 for other in placed):
          break
      else:
        continue
      colour = rs.uniform(0.6, 1.0, 3).astype(np.float32)
      alpha = glyph[..., None]
      patch = canvas[y0:y0 + size, x0:x0 + size]
      canvas[y0:y0 + size, x0:x0 + size] = patch * (1 - alpha) + colour * alpha
      placed.append([float(v) for v in box])
      placed_labels.append(int(classes[index]))
    images[n] = np.round(canvas * 255).astype(np.uint8)
    boxes[n], labels[n] = pad_boxes(placed, placed_labels, max_boxes)
  return images, boxes, labels


def generated_source(*, image_size=48, num_train=512, num_test=128, seed=0, max_boxes=4):
  def dataset(split, count):
    images, boxes, labels = generate_detection_arrays(
        count, image_size=image_size, split=split, seed=seed, max_boxes=max_boxes)
    return tf.data.Dataset.from_tensor_slices((images, {"boxes": boxes, "labels": labels}))
  return DetectionSource(GENERATED, dataset("train", num_train), dataset("test", num_test),
                         num_train, num_test, tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------
# COCO-format JSON.
# ----------------------------------------------------------------------------


def read_coco_json(annotations_path, images_dir, flag="--train_annotations"):
  """(paths, [(boxes xyxy in pixels, labels)], class names, skipped crowd count).

  Every annotation is validated here, before any training; errors name the item."""
  def fail(message):
    raise errors.DataError(f"{flag}={annotations_path}: {message}")
  if not os.path.isfile(annotations_path):
    fail("no such file")
  try:
    with open(annotations_path, encoding="utf-8-sig") as fh:
      coco = json.load(fh)
  except (OSError, ValueError) as e:
    fail(f"not a JSON file ({str(e).splitlines()[0]})")
  for key in ("images", "annotations", "categories"):
    if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
      fail(f"has no {key!r} list (not COCO format)")
  if not coco["categories"]:
    fail("lists no categories")
  if not coco["images"]:
    fail("lists no images")
  names = {}
  for category in coco["categories"]:
    try:
      names[int(category["id"])] = str(category.get("name", category["id"]))
    except (KeyError, TypeError, ValueError, AttributeError):
      fail(f"category entry {category!r:.120} lacks an integer id")
  category_ids = sorted(names)
  label_of = {cid: i for i, cid in enumerate(category_ids)}
  images = {}
  for image in coco["images"]:
    try:
      entry = (str(image["file_name"]), float(image["width"]), float(image["height"]))
      image_id = int(image["id"])
    except (KeyError, TypeError, ValueError):
      fail(f"image entry {image!r:.120} lacks id, file_name, width or height")
    if not (entry[1] > 0 and entry[2] > 0 and math.isfinite(entry[1] * entry[2])):
      fail(f"image {image_id} ({entry[0]}): width and height must be positive, not "
           f"{entry[1]:g}x{entry[2]:g}")
    if image_id in images:
      fail(f"image id {image_id} is listed twice ({images[image_id][0]}, {entry[0]})")
    images[image_id] = entry
  per_image = {image_id: ([], []) for image_id in images}
  crowd = 0
  for ann in coco["annotations"]:
    if not isinstance(ann, dict):
      fail(f"annotation entry {ann!r:.120} is not an object")
    ann_id = ann.get("id", "?")
    image_id = ann.get("image_id")
    if not isinstance(image_id, int) or image_id not in images:
      fail(f"annotation {ann_id}: image_id {image_id!r:.60} is not in 'images'")
    file_name, width, height = images[image_id]
    where = f"annotation {ann_id} ({file_name})"
    if ann.get("iscrowd", 0):
      crowd += 1  # COCO's crowd regions are ignored in training, as usual
      continue
    category = ann.get("category_id")
    if not isinstance(category, int) or category not in label_of:
      fail(f"{where}: category_id {category!r:.60} is not one of the "
           f"categories {category_ids[:10]}{'...' if len(category_ids) > 10 else ''}")
    try:
      x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
      fail(f"{where}: bbox must be [x, y, width, height]")
    if not all(math.isfinite(v) for v in (x, y, w, h)):
      fail(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] is not finite")
    if w <= 0 or h <= 0:
      fail(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] has zero area")
    tolerance = 1.0  # annotation tools round to the pixel
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or \
        y + h > height + tolerance:
      fail(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the "
           f"{width:g}x{height:g} image")
    boxes, labels = per_image[image_id]
    boxes.append([max(0.0, x), max(0.0, y), min(width, x + w), min(height, y + h)])
    labels.append(label_of[category])
  paths, targets = [], []
  for image_id, (file_name, width, height) in images.items():
    path = os.path.join(images_dir, file_name)
    if not os.path.isfile(path):
      fail(f"image {file_name!r} is not in {images_dir}")
    paths.append(path)
    boxes, labels = per_image[image_id]
    targets.append((np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels),
                    width, height))
  return paths, targets, tuple(names[c] for c in category_ids), crowd


def _decode_resized(path, boxes, labels, image_size):
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  image = tf.image.resize(image, (image_size, image_size))
  scale = tf.stack([image_size / shape[1], image_size / shape[0]] * 2)
  valid = labels >= 0
  boxes = tf.where(valid[:, None], boxes * scale, -1.0)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return image, {"boxes": boxes, "labels": labels}


def dropped_by_max_boxes(targets, max_boxes):
  """What --max_boxes leaves out of `targets` ([(boxes, labels, w, h)]): {} when
  nothing, else {"boxes": n, "images": m, "most_in_one_image": k}."""
  counts = [len(labels) for _, labels, _, _ in targets]
  over = [n for n in counts if n > max_boxes]
  if not over:
    return {}
  return {"boxes": int(sum(n - max_boxes for n in over)), "images": len(over),
          "most_in_one_image": int(max(over))}


def coco_json_source(train_annotations, train_images, test_annotations, test_images, *,
                     image_size, max_boxes):
  splits = {}
  names = None
  dropped = {}
  for flag, ann, folder in (("--train_annotations", train_annotations, train_images),
                            ("--test_annotations", test_annotations, test_images)):
    paths, targets, split_names, _ = read_coco_json(ann, folder, flag)
    if names is not None and split_names != names:
      raise errors.DataError(f"{flag}={ann}: its categories differ from the training "
                               "annotations'")
    names = split_names
    lost = dropped_by_max_boxes(targets, max_boxes)
    if lost:
      dropped["train" if flag == "--train_annotations" else "test"] = lost
    padded = [pad_boxes(b, l, max_boxes) for b, l, _, _ in targets]
    # Boxes are in original pixels; _decode_resized scales them with the image.
    ds = tf.data.Dataset.from_tensor_slices(
        (paths, np.stack([b for b, _ in padded]), np.stack([l for _, l in padded])))
    ds = ds.map(lambda p, b, l: _decode_resized(p, b, l, image_size),
                num_parallel_calls=tf.data.AUTOTUNE)
    splits[flag] = (ds, len(paths))
  (train, n_train), (test, n_test) = splits.values()
  return DetectionSource(COCO_JSON, train, test, n_train, n_test, names, dropped)


# ----------------------------------------------------------------------------
# tensorflow-datasets (COCO).
# ----------------------------------------------------------------------------


def tfds_detection_source(name, data_dir, train_split, test_split, *, image_size,
                          max_boxes):
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise errors.DataError(
        f"--dataset={name}: not prepared in --tfds_data_dir={data_dir or '~/tensorflow_datasets'}; "
        f"run `python -m tensorflow_datasets.scripts.download_and_prepare --datasets={name}` "
        "on a machine with network and copy it there")
  features = builder.info.features
  if "objects" not in features or "bbox" not in features["objects"]:
    raise errors.DataError(f"--dataset={name}: not a detection set (needs objects/bbox)")

  def convert(example):
    image = tf.image.resize(example["image"], (image_size, image_size))
    yxyx = example["objects"]["bbox"][:max_boxes] * image_size  # normalised -> pixels
    boxes = tf.stack([yxyx[:, 1], yxyx[:, 0], yxyx[:, 3], yxyx[:, 2]], axis=-1)
    labels = tf.cast(example["objects"]["label"][:max_boxes], tf.int32)
    pad = max_boxes - tf.shape(labels)[0]
    boxes = tf.pad(boxes, [[0, pad], [0, 0]], constant_values=-1.0)
    labels = tf.pad(labels, [[0, pad]], constant_values=-1)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image, {"boxes": tf.ensure_shape(boxes, (max_boxes, 4)),
                   "labels": tf.ensure_shape(labels, (max_boxes,))}

  def load(split):
    return builder.as_dataset(split=split, shuffle_files=False).map(
        convert, num_parallel_calls=tf.data.AUTOTUNE)
  splits = builder.info.splits
  return DetectionSource(name, load(train_split), load(test_split),
                         splits[train_split].num_examples, splits[test_split].num_examples,
                         tuple(features["objects"]["label"].names))


def load_detection_source(cfg):
  """The DetectionSource a config.DetectionDataConfig names."""
  if cfg.dataset == GENERATED:
    return generated_source(image_size=cfg.image_size, num_train=cfg.num_train_images,
                            num_test=cfg.num_test_images, seed=cfg.data_seed,
                            max_boxes=cfg.max_boxes)
  if cfg.dataset == COCO_JSON:
    return coco_json_source(cfg.train_annotations, cfg.train_images, cfg.test_annotations,
                            cfg.test_images, image_size=cfg.image_size,
                            max_boxes=cfg.max_boxes)
  return tfds_detection_source(cfg.dataset, cfg.tfds_data_dir or None, cfg.train_split,
                               cfg.test_split, image_size=cfg.image_size,
                               max_boxes=cfg.max_boxes)
