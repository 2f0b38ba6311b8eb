"""COCO-style average precision, in plain numpy (the pycocotools rules).

For each class and IoU threshold: detections of all images sorted by score
(descending, stable); each is matched to the unmatched ground-truth box of the same
image and class with the highest IoU, if that IoU >= the threshold; precision is made
monotone (the envelope from the right) and sampled at 101 recall points
0, 0.01, ..., 1 (a recall never reached counts 0). AP is averaged over the classes
that have ground truth; mAP averages over IoU thresholds 0.50:0.05:0.95.

Not reproduced from pycocotools: crowd regions, area ranges (small/medium/large) and
its cap of 100 detections per image (callers keep at most that many).
"""

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou(a, b):
  """IoU matrix of (N, 4) and (M, 4) xyxy boxes."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
  area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _class_ap(detections, ground_truth, threshold):
  """detections: [(image, score, box)], ground_truth: {image: (G, 4)}; AP or None."""
  num_gt = sum(len(g) for g in ground_truth.values())
  if num_gt == 0:
    return None
  order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
  matched = {image: np.zeros(len(g), bool) for image, g in ground_truth.items()}
  tp = np.zeros(len(order))
  for rank, i in enumerate(order):
    image, _, box = detections[i]
    gts = ground_truth.get(image)
    if gts is None or not len(gts):
      continue
    ious = box_iou([box], gts)[0]
    ious[matched[image]] = -1.0
    best = int(np.argmax(ious))
    if ious[best] >= threshold:
      matched[image][best] = True
      tp[rank] = 1
  tp_cum = np.cumsum(tp)
  recall = tp_cum / num_gt
  precision = tp_cum / np.arange(1, len(order) + 1)
  # Envelope: the best precision at any recall at least this high.
  precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
  sampled = np.zeros(len(RECALL_POINTS))
  indices = np.searchsorted(recall, RECALL_POINTS, side="left")
  valid = indices < len(precision)
  sampled[valid] = precision[indices[valid]]
  return float(sampled.mean())


def coco_map(predictions, ground_truths, num_classes):
  """predictions: per image (boxes (K, 4), scores (K,), labels (K,)); ground_truths:
  per image (boxes (G, 4), labels (G,)), padding (label -1) allowed in both.

  Returns {"mAP": .., "AP50": .., "AP75": .., "per_class_AP": [...]} in [0, 1]
  (per_class_AP: mean over thresholds, None for a class without ground truth)."""
  if len(predictions) != len(ground_truths):
    raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} images")
  dets = [[] for _ in range(num_classes)]
  gts = [dict() for _ in range(num_classes)]
  for image, ((p_boxes, p_scores, p_labels), (g_boxes, g_labels)) in enumerate(
      zip(predictions, ground_truths)):
    g_boxes = np.asarray(g_boxes, np.float64).reshape(-1, 4)
    g_labels = np.asarray(g_labels).reshape(-1)
    for c in range(num_classes):
      gts[c][image] = g_boxes[g_labels == c]
    p_boxes = np.asarray(p_boxes, np.float64).reshape(-1, 4)
    for box, score, label in zip(p_boxes, np.asarray(p_scores).reshape(-1),
                                 np.asarray(p_labels).reshape(-1)):
      if 0 <= label < num_classes:
        dets[int(label)].append((image, float(score), box))
  table = np.full((len(IOU_THRESHOLDS), num_classes), np.nan)
  for c in range(num_classes):
    for t, threshold in enumerate(IOU_THRESHOLDS):
      ap = _class_ap(dets[c], gts[c], threshold)
      if ap is not None:
        table[t, c] = ap
  with np.errstate(invalid="ignore"):
    present = ~np.isnan(table[0])
    if not present.any():
      return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class_AP": [None] * num_classes}
    per_class = [float(np.mean(table[:, c])) if present[c] else None
                 for c in range(num_classes)]
    return {"mAP": float(np.mean(table[:, present])),
            "AP50": float(np.mean(table[0, present])),
            "AP75": float(np.mean(table[5, present])),
            "per_class_AP": per_class}
