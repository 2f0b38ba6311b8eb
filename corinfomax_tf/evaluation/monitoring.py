"""What tells a user, within minutes, whether CorInfoMax is working.

Pure functions (NumPy, float64) for the quantities the paper's appendix plots, and a
callback that logs them to TensorBoard every N steps, host-side and off the
gradient path:
  * the eigenvalue spectrum of each running covariance R (histogram over time and an
    image of the sorted spectrum at the current step);
  * the effective rank exp(H(p)), p the normalised eigenvalues, and its share of D;
  * the LDMI between the two views' projections (the paper's equation 1) from the
    running auto- and cross-covariances;
  * weight norm; warnings (log + TensorBoard text) on dimensional collapse (effective
    rank below a share of D) and on total collapse (no attraction left and no
    variance left).
"""

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image, ImageDraw

from corinfomax_tf.data import augment


def eigenvalues(R):
  """Eigenvalues of a symmetric matrix, descending, float64."""
  R = np.asarray(R, np.float64)
  return np.linalg.eigvalsh(0.5 * (R + R.T))[::-1]


def effective_rank(eigs):
  """exp of the Shannon entropy of the normalised (clipped >= 0) eigenvalues.

  Roy & Vetterli (2007): D for a flat spectrum, about k for k equal non-zero ones.
  """
  lam = np.clip(np.asarray(eigs, np.float64), 0.0, None)
  total = lam.sum()
  if total <= 0:
    return 0.0
  p = lam[lam > 0] / total
  return float(np.exp(-(p * np.log(p)).sum()))


def _logdet(A):
  sign, value = np.linalg.slogdet(A)
  return value if sign > 0 else float("nan")


def ldmi(R1, R2, R12, eps):
  """The paper's equation (1), the log-determinant mutual information:

    I(z1; z2) = 1/2 logdet(R1 + eps I) - 1/2 logdet(R1 - R12 (R2 + eps I)^-1 R12^T + eps I)

  R12 = E[(z1 - mu1)(z2 - mu2)^T]. 0 for uncorrelated views; large when one view
  determines the other linearly.
  """
  R1, R2, R12 = (np.asarray(m, np.float64) for m in (R1, R2, R12))
  eye = np.eye(R1.shape[0])
  schur = R1 - R12 @ np.linalg.solve(R2 + eps * eye, R12.T)
  schur = 0.5 * (schur + schur.T)
  return 0.5 * _logdet(R1 + eps * eye) - 0.5 * _logdet(schur + eps * eye)


def assess_health(spectra, attraction, dim, rank_share_threshold,
                  attraction_floor=1e-7, variance_floor=1e-6):
  """Warnings (strings) for a collapsed run; empty when healthy.

  spectra: {name: eigenvalues} of the running covariances.
  """
  warnings = []
  for name, eigs in spectra.items():
    rank = effective_rank(eigs)
    top = float(np.max(eigs)) if len(eigs) else 0.0
    if attraction is not None and attraction < attraction_floor and top < variance_floor:
      warnings.append(
          f"total collapse: attraction {attraction:.2e} and the largest eigenvalue of "
          f"{name} is {top:.2e}: every sample maps to the same point")
    elif rank < rank_share_threshold * dim:
      warnings.append(
          f"dimensional collapse: effective rank of {name} is {rank:.1f} of D={dim} "
          f"({100 * rank / dim:.1f}% < {100 * rank_share_threshold:.0f}%)")
  return warnings


def spectrum_image(spectra, width=320, height=200):
  """A line plot of log10 of each sorted spectrum, as a uint8 RGB array."""
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  logs = {k: np.log10(np.clip(np.asarray(v, np.float64), 1e-12, None))
          for k, v in spectra.items()}
  lo = min(float(v.min()) for v in logs.values())
  hi = max(float(v.max()) for v in logs.values())
  hi = hi if hi > lo else lo + 1.0
  margin = 24
  draw.rectangle([margin, 4, width - 5, height - margin], outline="black")
  colours = ["#1f77b4", "#d62728", "#2ca02c"]
  for i, (name, values) in enumerate(logs.items()):
    n = len(values)
    xs = margin + (np.arange(n) / max(n - 1, 1)) * (width - 5 - margin)
    ys = (height - margin) - (values - lo) / (hi - lo) * (height - margin - 4)
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colours[i % 3], width=2)
    draw.text((margin + 6, 8 + 12 * i), name, fill=colours[i % 3])
  draw.text((2, 4), f"{hi:.0f}", fill="black")
  draw.text((2, height - margin - 10), f"{lo:.0f}", fill="black")
  draw.text((margin, height - margin + 6), "eigenvalue index (sorted), log10 scale",
            fill="black")
  return np.asarray(image, np.uint8)


def _global_norm(variables):
  if keras.backend.backend() == "tensorflow":
    return float(tf.linalg.global_norm(variables))
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(v.value, np.float32)))
                           for v in variables)))


class TrainingMonitor(keras.callbacks.Callback):
  """Logs the covariance spectra, effective rank, LDMI and weight norm every N steps
  and warns on collapse."""

  def __init__(self, logdir, every_steps, rank_share_threshold=0.1, log=None):
    super().__init__()
    self.writer = tf.summary.create_file_writer(logdir)
    self.every = every_steps
    self.threshold = rank_share_threshold
    self.log = log or logging.warning
    self.warnings = []      # (step, message), for callers and tests
    self.last = {}

  def on_train_batch_end(self, batch, logs=None):
    step = int(self.model.step_counter.numpy())
    if step % self.every:
      return
    self.last = self.measure(step, logs or {})

  def measure(self, step, logs):
    layer = self.model.loss_layer
    dim = layer.dim
    covs = {name: getattr(layer, name).numpy() for name in layer.state if name.startswith("R")}
    spectra = {name: eigenvalues(R) for name, R in covs.items()}
    out = {}
    with self.writer.as_default(step=step):
      for name, eigs in spectra.items():
        rank = effective_rank(eigs)
        out[f"{name}/effective_rank"] = rank
        tf.summary.scalar(f"spectrum/{name}_effective_rank", rank)
        tf.summary.scalar(f"spectrum/{name}_effective_rank_share", rank / dim)
        tf.summary.histogram(f"spectrum/{name}_log10_eigenvalues",
                             np.log10(np.clip(eigs, 1e-12, None)))
      tf.summary.image("spectrum/sorted_eigenvalues", spectrum_image(spectra)[None])
      if layer.R12 is not None:
        R1 = covs.get("R1", covs.get("R"))
        R2 = covs.get("R2", covs.get("R"))
        value = ldmi(R1, R2, layer.R12.numpy(), layer.eps)
        out["ldmi"] = value
        tf.summary.scalar("spectrum/ldmi", value)
      weight_norm = _global_norm(self.model.pretraining_variables)
      out["weight_norm"] = weight_norm
      tf.summary.scalar("optim/weight_norm", weight_norm)
      attraction = logs.get("attraction")
      attraction = None if attraction is None else float(np.asarray(attraction).reshape(-1)[0])
      for message in assess_health(spectra, attraction, dim, self.threshold):
        self.warnings.append((step, message))
        self.log(f"step {step}: {message}")
        tf.summary.text("health/warning", f"step {step}: {message}")
    return out

  def on_train_end(self, logs=None):
    self.writer.flush()


def augmentation_preview(images, views, image_size, mean, std, seed=0):
  """A grid (uint8) with one row per image: the original, view 1, view 2."""
  rows = []
  mean_arr = np.asarray(mean, np.float32)
  std_arr = np.asarray(std, np.float32)
  for i, image in enumerate(images):
    x = augment.to_float(tf.convert_to_tensor(image))
    original = augment.resize(x, (image_size, image_size)).numpy()
    cells = [original]
    for v, view in enumerate(views):
      out = augment.augment_view(x, image_size, view, mean, std,
                                 tf.constant([seed, i * 2 + v], tf.int64)).numpy()
      cells.append(np.clip(out * std_arr + mean_arr, 0.0, 1.0))
    rows.append(np.concatenate(cells, axis=1))
  grid = np.concatenate(rows, axis=0)
  return (grid * 255).round().astype(np.uint8)
