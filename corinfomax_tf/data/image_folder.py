"""Listing and checking image files: which are kept, which skipped, and why.

Two layouts: a labelled folder (root/<class>/<file>, `scan_image_folder`) and a
user's unlabeled images (`scan_unlabeled_images`: every file of a tree, in any nesting
of folders, or the files a text list names). Both go through the same checks.

A pretraining run reads an image folder for days; one corrupt file must not stop it
at hour 30 with a stack trace from inside tf.data. So the folder is checked once,
before any work starts, and every file lands in one of three bins:

  * kept as is;
  * kept and converted (CMYK, 16-bit, grayscale, palette, alpha): the decoder turns
    them into 8-bit RGB, and the count is reported;
  * skipped, with the reason: not an image (by extension), empty file, unreadable
    (no known image header), a format tf.io.decode_image cannot read, truncated,
    corrupt (full check only), or larger than `max_pixels` (one decoded 20k x 20k image is 1.2 GB per parallel
    call).

With `on_bad="error"` the first bad file stops the run instead, named in the error.
An empty class folder (after skipping) is always an error: it would silently shift
every label after it.

Checks, cheapest first: "none" (extension and size only), "header" (the default:
PIL reads the header and the file's last bytes, which catches garbage, unsupported
formats, huge images and the common truncations of JPEG and PNG; what still fails
to decode is dropped by the pipeline and logged by tf.data), "full" (also decodes
every image with the training decoder, so that every kept file is known to decode:
slow on ImageNet, exact).
"""

import collections
import concurrent.futures
import dataclasses
import os

import tensorflow as tf
from PIL import Image

from corinfomax_tf import errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
CHECKS = ("none", "header", "full")
ON_BAD = ("skip", "error")
DEFAULT_MAX_PIXELS = 50_000_000
# What tf.io.decode_image reads (the extension may lie: a PNG named .jpg is fine).
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
# Modes the decoder converts to 8-bit RGB.
CONVERTED_MODES = {"CMYK": "cmyk", "I;16": "16-bit", "I;16B": "16-bit", "I": "16-bit",
                   "L": "grayscale", "LA": "grayscale", "1": "grayscale",
                   "P": "palette", "RGBA": "alpha", "PA": "palette"}
SKIP_REASONS = ("not_an_image", "empty_file", "unreadable", "unsupported_format",
                "truncated", "too_large", "corrupt")


@dataclasses.dataclass
class FolderScan:
  """The outcome of scanning root/<class>/<file>."""
  root: str
  paths: list
  labels: list
  classes: list
  skipped: dict     # reason -> [(path, detail)]
  converted: dict   # kind -> count

  @property
  def num_skipped(self):
    return sum(len(v) for v in self.skipped.values())

  def summary(self):
    """One line for the log."""
    parts = [f"{len(self.paths)} images in {len(self.classes)} classes kept"
             if self.classes else f"{len(self.paths)} images kept (no labels)"]
    if self.converted:
      parts.append("converted to RGB: " + ", ".join(
          f"{n} {kind}" for kind, n in sorted(self.converted.items())))
    if self.skipped:
      parts.append(f"{self.num_skipped} skipped: " + ", ".join(
          f"{len(v)} {reason}" for reason, v in sorted(self.skipped.items())))
    return f"{self.root}: " + "; ".join(parts)

  def to_dict(self, max_listed=100):
    return dict(root=self.root, kept=len(self.paths), classes=len(self.classes),
                converted=dict(self.converted),
                skipped={reason: dict(count=len(v), files=[
                    dict(path=p, detail=d) for p, d in v[:max_listed]])
                         for reason, v in self.skipped.items()})


def _tail_is_complete(path, image_format):
  """JPEG ends with the EOI marker, PNG with the IEND chunk: cheap truncation check."""
  with open(path, "rb") as fh:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - 1024))
    tail = fh.read()
  if image_format == "JPEG":
    return b"\xff\xd9" in tail
  if image_format == "PNG":
    return b"IEND" in tail[-16:]
  return True


def check_file(path, check="header", max_pixels=DEFAULT_MAX_PIXELS):
  """(skip reason or None, detail): one file's verdict."""
  if not path.lower().endswith(IMAGE_EXTENSIONS):
    return "not_an_image", "extension not in " + " ".join(IMAGE_EXTENSIONS)
  try:
    size = os.path.getsize(path)
  except OSError as e:
    return "unreadable", e.strerror
  if size == 0:
    return "empty_file", "0 bytes"
  if check == "none":
    return None, ""
  try:
    with Image.open(path) as image:
      image_format, mode, (width, height) = image.format, image.mode, image.size
      if image_format not in DECODABLE_FORMATS:
        return "unsupported_format", f"{image_format} ({', '.join(DECODABLE_FORMATS)} read)"
      if width * height > max_pixels:
        return "too_large", f"{width}x{height} pixels > {max_pixels}"
  except (OSError, SyntaxError, ValueError) as e:
    # PIL: UnidentifiedImageError (an OSError) for garbage, OSError for truncation.
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "truncated" in message or "broken data stream" in message:
      return "truncated", message
    return "unreadable", message
  except Image.DecompressionBombError as e:
    return "too_large", str(e).splitlines()[0]
  if not _tail_is_complete(path, image_format):
    return "truncated", f"{image_format} without its end marker"
  if check == "full":
    problem = _tf_decode_problem(path)
    if problem:
      return "corrupt", problem
  return None, CONVERTED_MODES.get(mode, "")


def _tf_decode_problem(path):
  """The training decoder's own verdict (PIL forgives some files it rejects)."""
  try:
    tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    return e.message.splitlines()[0][:200]
  return None


def _check_options(check, on_bad):
  if check not in CHECKS:
    raise errors.DataError(f"--image_check={check}: must be one of {CHECKS}")
  if on_bad not in ON_BAD:
    raise errors.DataError(f"--bad_images={on_bad}: must be one of {ON_BAD}")


def check_files(candidates, flag, check="header", max_pixels=DEFAULT_MAX_PIXELS,
                on_bad="skip", workers=16):
  """[(path, label)] -> (kept paths, their labels, skipped {reason: [(path, detail)]},
  converted {kind: count}); with on_bad="error" the first bad image is a DataError."""
  # PIL releases the GIL while reading files: threads make the scan I/O-bound.
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    verdicts = list(pool.map(lambda c: check_file(c[0], check, max_pixels),
                             candidates))
  paths, labels = [], []
  skipped = collections.defaultdict(list)
  converted = collections.Counter()
  for (path, label), (reason, detail) in zip(candidates, verdicts):
    if reason is None:
      paths.append(path)
      labels.append(label)
      if detail:
        converted[detail] += 1
      continue
    if on_bad == "error" and reason != "not_an_image":
      raise errors.DataError(f"{flag}: bad image {path!r}: {reason.replace('_', ' ')} "
                             f"({detail}); remove it or pass --bad_images=skip")
    skipped[reason].append((path, detail))
  return paths, labels, dict(skipped), dict(converted)


def scan_image_folder(root, flag="--data_dir", check="header",
                      max_pixels=DEFAULT_MAX_PIXELS, on_bad="skip", workers=16):
  """Lists root/<class>/<file>, checks every file, and sorts out what is usable."""
  _check_options(check, on_bad)
  if not os.path.isdir(root):
    raise errors.DataError(f"{flag}: directory {root!r} does not exist")
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  if not classes:
    raise errors.DataError(f"{flag}: {root!r} has no class sub-folders (for images "
                           "without labels use --dataset=images)")
  candidates = []
  for index, name in enumerate(classes):
    folder = os.path.join(root, name)
    for entry in sorted(os.listdir(folder)):
      path = os.path.join(folder, entry)
      if os.path.isfile(path):
        candidates.append((path, index))
  paths, labels, skipped, converted = check_files(candidates, flag, check, max_pixels,
                                                  on_bad, workers)
  counts = collections.Counter(labels)
  for index, name in enumerate(classes):
    if not counts[index]:
      folder = os.path.join(root, name)
      raise errors.DataError(f"{flag}: class folder {folder!r} holds no usable images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); remove the folder or add images")
  return FolderScan(root, paths, labels, classes, skipped, converted)


# ----------------------------------------------------------------------------
# Unlabeled images: any tree of files, or a text file listing them.
# ----------------------------------------------------------------------------


def list_image_tree(root):
  """Every file under root, nested folders included (hidden ones left out; linked
  folders followed once), in a fixed order."""
  files, seen = [], set()
  for folder, subfolders, names in os.walk(root, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:  # a link back up the tree
      subfolders[:] = []
      continue
    seen.add(real)
    subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    files.extend(os.path.join(folder, n) for n in sorted(names) if not n.startswith("."))
  return files


def read_image_list(list_file, flag="--data_dir"):
  """The paths a text file names, one per line (blank lines and '#' comments left
  out; relative paths are relative to the file's folder). A missing file is an error
  naming its line: a list is a promise, unlike a folder."""
  try:
    with open(list_file, encoding="utf-8-sig") as fh:  # a BOM is not a path
      lines = fh.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{flag}: cannot read the image list {list_file!r} "
                           f"({getattr(e, 'strerror', None) or e})") from None
  base = os.path.dirname(os.path.abspath(list_file))
  paths, missing = [], []
  for number, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    path = line if os.path.isabs(line) else os.path.join(base, line)
    if not os.path.isfile(path):
      missing.append((number, line))
    paths.append(path)
  if missing:
    number, line = missing[0]
    more = f" ({len(missing)} missing in all)" if len(missing) > 1 else ""
    raise errors.DataError(f"{flag}: line {number} of {list_file!r} names {line!r}, "
                           f"which is not a file{more}")
  return paths


def scan_unlabeled_images(data_dir, flag="--data_dir", check="header",
                          max_pixels=DEFAULT_MAX_PIXELS, on_bad="skip", workers=16):
  """The images of a tree (any nesting) or of a list file, checked like a folder's;
  labels are -1. An empty tree, or one without a usable image, is a DataError."""
  _check_options(check, on_bad)
  if os.path.isdir(data_dir):
    files = list_image_tree(data_dir)
    if not files:
      raise errors.DataError(f"{flag}: {data_dir!r} holds no files")
  elif os.path.isfile(data_dir):
    files = read_image_list(data_dir, flag)
    if not files:
      raise errors.DataError(f"{flag}: the image list {data_dir!r} names no file")
  else:
    raise errors.DataError(f"{flag}: {data_dir!r} is neither a directory nor a "
                           "list file")
  paths, labels, skipped, converted = check_files(
      [(f, -1) for f in files], flag, check, max_pixels, on_bad, workers)
  scan = FolderScan(data_dir, paths, labels, [], skipped, converted)
  if not paths:
    raise errors.DataError(f"{flag}: no usable image in {data_dir!r} ("
                           f"{scan.summary().split(': ', 1)[1]}; read: "
                           f"{', '.join(IMAGE_EXTENSIONS)})")
  return scan
