"""Detection: COCO-style mAP on hand-made boxes, data sources, the RetinaNet on our
backbone, and the command."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image


from corinfomax_tf.data import detection as detection_data
from corinfomax_tf.evaluation import detection_metrics
from corinfomax_tf.models import detector as detector_lib
from tests import helpers
from corinfomax_tf import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _map(predictions, ground_truths, num_classes=1):
  return detection_metrics.coco_map(predictions, ground_truths, num_classes)


def _pred(boxes, scores, labels=None):
  labels = [0] * len(scores) if labels is None else labels
  return (np.array(boxes, float).reshape(-1, 4), np.array(scores), np.array(labels))


def test_map_of_perfect_and_of_hand_worked_detections():
  gt = [(np.array([[0, 0, 10, 10], [20, 20, 30, 35]]), np.array([0, 0]))]
  assert _map([_pred(gt[0][0], [0.9, 0.8])], gt)["mAP"] == pytest.approx(1.0)
  # A false positive ranked above the true positive: precision 1/2 at recall 1.
  one = [(np.array([[0, 0, 10, 10]]), np.array([0]))]
  r = _map([_pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8])], one)
  assert r["mAP"] == pytest.approx(0.5) and r["AP50"] == pytest.approx(0.5)
  # IoU 100/130 = 0.769: a hit at thresholds 0.50 ... 0.75 (6 of 10).
  r = _map([_pred([[0, 0, 10, 13]], [0.7])], one)
  assert (r["mAP"], r["AP50"], r["AP75"]) == pytest.approx((0.6, 1.0, 1.0))
  # A duplicate of a matched box is a false positive after the recall is complete.
  assert _map([_pred([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])], one)["mAP"] == \
      pytest.approx(1.0)
  # Half the boxes found: precision 1 on the 51 recall points 0.00 ... 0.50.
  assert _map([_pred([[0, 0, 10, 10]], [0.9])], gt)["mAP"] == pytest.approx(51 / 101)
  # Nothing detected.
  assert _map([_pred(np.zeros((0, 4)), [])], gt)["mAP"] == 0.0


def test_map_averages_classes_with_ground_truth_and_matches_within_images():
  gts = [(np.array([[0, 0, 10, 10], [20, 0, 30, 10]]), np.array([0, 1])),
         (np.array([[0, 0, 10, 10]]), np.array([0]))]
  preds = [_pred([[0, 0, 10, 10], [20, 0, 30, 10], [40, 40, 50, 50]], [0.9, 0.3, 0.8],
                 [0, 0, 2]),          # class 1 box labelled 0; class 2 has no ground truth
           _pred([[0, 0, 10, 10]], [0.5], [0])]
  r = detection_metrics.coco_map(preds, gts, num_classes=3)
  # Class 0: scores 0.9 (hit, image 0), 0.5 (hit, image 1), 0.3 (false: wrong class box)
  # -> AP 1; class 1: never detected -> AP 0; class 2: no ground truth -> left out.
  assert r["per_class_AP"] == [pytest.approx(1.0), 0.0, None]
  assert r["mAP"] == pytest.approx(0.5)
  # A box of image 0 cannot match ground truth of image 1.
  swapped = [_pred(np.zeros((0, 4)), []), _pred([[20, 0, 30, 10]], [0.9], [1])]
  assert detection_metrics.coco_map(swapped, gts, 3)["per_class_AP"][1] == 0.0


def test_generated_set_has_valid_boxes_and_is_reproducible():
  images, boxes, labels = detection_data.generate_detection_arrays(20, image_size=48, seed=3)
  assert images.shape == (20, 48, 48, 3) and images.dtype == np.uint8
  valid = labels >= 0
  assert valid[:, 0].all() and (valid.sum(1) <= 3).all()
  b = boxes[valid]
  assert (b[:, 0] >= 0).all() and (b[:, 3] <= 48).all() and (b[:, 2] > b[:, 0]).all()
  assert ((b[:, 2] - b[:, 0]) >= 3).all() and ((b[:, 3] - b[:, 1]) >= 3).all()
  assert set(labels[valid]) <= set(range(10))
  assert (boxes[~valid] == -1).all()
  again = detection_data.generate_detection_arrays(20, image_size=48, seed=3)
  np.testing.assert_array_equal(again[0], images)
  test_images = detection_data.generate_detection_arrays(20, image_size=48, seed=3,
                                                         split="test")[0]
  assert not np.array_equal(test_images, images)
  # The object really is inside its box: the box region is brighter than elsewhere.
  i = 0
  x0, y0, x1, y1 = boxes[i, 0].astype(int)
  assert images[i, y0:y1, x0:x1].max() > images[i].mean()


def _write_coco(tmp_path, annotations, categories=({"id": 3, "name": "cat"},
                                                    {"id": 7, "name": "dog"})):
  folder = tmp_path / "images"
  folder.mkdir(exist_ok=True)
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(folder / "a.png")
  Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / "b.png")
  coco = {"images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40},
                     {"id": 2, "file_name": "b.png", "width": 30, "height": 30}],
          "annotations": annotations, "categories": list(categories)}
  path = tmp_path / "ann.json"
  path.write_text(json.dumps(coco))
  return str(path), str(folder)


def test_coco_json_boxes_are_scaled_with_the_image(tmp_path):
  ann, folder = _write_coco(tmp_path, [
      {"id": 10, "image_id": 1, "category_id": 7, "bbox": [6, 4, 30, 20]},
      {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
      {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 30]}])
  source = detection_data.coco_json_source(ann, folder, ann, folder, image_size=20,
                                           max_boxes=2)
  assert source.class_names == ("cat", "dog") and source.num_train == 2
  (image_a, target_a), (image_b, target_b) = list(source.train)
  assert image_a.shape == (20, 20, 3)
  np.testing.assert_allclose(target_a["boxes"][0], [2, 2, 12, 12])  # x/3, y/2
  np.testing.assert_array_equal(target_a["labels"], [1, -1])          # crowd dropped
  np.testing.assert_allclose(target_b["boxes"][0], [0, 0, 20, 20])


@pytest.mark.parametrize("annotation, needle", [
    ({"id": 5, "image_id": 1, "category_id": 3, "bbox": [50, 10, 20, 10]},
     "annotation 5 (a.png): box [50, 10, 20, 10] lies outside the 60x40 image"),
    ({"id": 6, "image_id": 2, "category_id": 3, "bbox": [1, 1, 0, 4]},
     "annotation 6 (b.png): box [1, 1, 0, 4] has zero area"),
    ({"id": 7, "image_id": 2, "category_id": 99, "bbox": [1, 1, 4, 4]},
     "annotation 7 (b.png): category_id 99 is not one of the categories [3, 7]"),
    ({"id": 8, "image_id": 9, "category_id": 3, "bbox": [1, 1, 4, 4]},
     "annotation 8: image_id 9 is not in 'images'"),
])
def test_bad_user_annotations_are_named(tmp_path, annotation, needle):
  ann, folder = _write_coco(tmp_path, [annotation])
  with pytest.raises(errors.DataError) as info:
    detection_data.read_coco_json(ann, folder)
  assert f"--train_annotations={ann}: {needle}" == str(info.value)


def test_missing_image_file_is_named(tmp_path):
  ann, folder = _write_coco(tmp_path, [])
  os.remove(os.path.join(folder, "b.png"))
  with pytest.raises(errors.DataError, match="image 'b.png' is not in"):
    detection_data.read_coco_json(ann, folder)


def test_pyramid_levels_follow_the_true_strides():
  assert detector_lib.levels_for("imagenet") == (3, 7)
  assert detector_lib.levels_for("cifar") == (2, 4)
  with pytest.raises(errors.ConfigError, match="--max_level=5: .*ends at 3"):
    detector_lib.levels_for("cifar", 2, 5)
  with pytest.raises(errors.ConfigError, match="--min_level=1: .*levels 2..5"):
    detector_lib.levels_for("imagenet", 1, 5)


def test_anchor_coverage_and_the_cifar_stem_default_that_covers_the_generated_boxes():
  generator = detector_lib.anchor_generator("cifar", 2, 4, anchor_size=4.0)
  anchors = np.concatenate([np.asarray(v) for v in generator(
      np.zeros((1, 48, 48, 3), np.float32)).values()])
  # A box equal to an anchor is covered; a 3-pixel one is not.
  assert detector_lib.anchor_coverage(generator, 48, anchors[:1]) == 1.0
  assert detector_lib.anchor_coverage(generator, 48, [[20, 20, 23, 23]]) == 0.0
  _, boxes, labels = detection_data.generate_detection_arrays(256, image_size=48)
  boxes = boxes[labels >= 0]
  # COCO's anchor size misses a fifth of the generated digits; the CIFAR default not.
  assert detector_lib.anchor_coverage(generator, 48, boxes) < 0.85
  default = detector_lib.anchor_generator("cifar", 2, 4)
  assert default.anchor_size == 3.0
  assert detector_lib.anchor_coverage(default, 48, boxes) > 0.99


def test_detection_picture_draws_true_and_confident_predicted_boxes():
  from corinfomax_tf.downstream import detection as detect
  image = np.zeros((16, 16, 3), np.uint8)
  picture = detect.detection_picture(
      [image, image], [(np.array([[2.0, 2, 8, 8]]), np.array([0.9]), np.array([1])),
                       (np.array([[2.0, 2, 8, 8]]), np.array([0.1]), np.array([1]))],
      [(np.array([[9.0, 9, 14, 14]]), np.array([3]))] * 2, ["a", "b", "c", "d"], scale=4)
  assert picture.shape == (64, 64 + 4 + 64, 3)
  green = (picture[..., 1] > 200) & (picture[..., 0] < 50)
  red = (picture[..., 0] > 200) & (picture[..., 1] < 100)
  assert green[:, :64].any() and green[:, 68:].any()
  assert red[:, :64].any() and not red[:, 68:].any()   # 0.1 is below min_score


def test_retinanet_on_our_backbone_trains_and_gives_boxes(trained, tmp_path):
  from corinfomax_tf import config
  from corinfomax_tf.downstream import detection as detect
  from corinfomax_tf.export import saved_model as export_lib
  _, export_dir = trained
  encoder, metadata = export_lib.load_trainable_encoder(export_dir)
  before = encoder.get_layer("stem_conv").get_weights()[0].copy()
  source = detection_data.generated_source(image_size=32, num_train=64, num_test=16)
  cfg = config.DetectConfig(encoder=export_dir, workdir=str(tmp_path / "det"),
                            data=config.DetectionDataConfig(image_size=32), epochs=4,
                            batch_size=8, lr=0.01, eval_every_epochs=4)
  result = detect.run_detection(encoder, metadata, source, cfg, log=lambda line: None)
  assert result["last_epoch_loss"] < result["first_epoch_loss"]
  assert not np.array_equal(before, encoder.get_layer("stem_conv").get_weights()[0])
  assert 0.0 <= result["mAP"] <= result["AP50"] <= 1.0
  assert 0.0 <= result["train_mAP"] <= result["train_AP50"] <= 1.0
  assert result["train_eval_images"] == 64 and result["anchor_coverage"] > 0.95
  assert os.path.isfile(os.path.join(cfg.workdir, "detections.png"))
  detector = detector_lib.build_detector(encoder, metadata, 10, image_size=32)
  predictions, truths = detect.predict_boxes(detector, source.test, batch_size=8)
  assert len(predictions) == len(truths) == 16
  for boxes, scores, labels in predictions:
    assert boxes.shape[1:] == (4,) and len(boxes) == len(scores) == len(labels) <= 100
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes <= 32).all()
    assert ((scores >= 0.05) & (scores <= 1)).all() and ((labels >= 0) & (labels < 10)).all()


def test_command_resumes_writes_results_and_names_bad_input(trained, tmp_path):
  _, export_dir = trained
  workdir = str(tmp_path / "det")
  common = [f"--encoder={export_dir}", f"--workdir={workdir}", "--image_size=32",
            "--num_train_images=32", "--num_test_images=8", "--batch_size=8",
            "--eval_every_epochs=1"]

  def run(*args):
    return helpers.run([sys.executable, "-m", "corinfomax_tf.detect", *common, *args],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
  # Training, results and resuming (killed, rerun) are tested in test_resume.py.

  ann, folder = _write_coco(tmp_path, [
      {"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 3]}])
  cases = [
      ([f"--encoder={tmp_path}"], "not a corinfomax_tf encoder export"),
      (["--dataset=coco_json", f"--train_annotations={ann}", f"--train_images={folder}",
        f"--test_annotations={ann}", f"--test_images={folder}"],
       "annotation 4 (a.png): box [1, 1, 0, 3] has zero area"),
      (["--image_size=40"], "--image_size=40: must be divisible by 2**max_level = 16"),
  ]
  helpers.assert_one_line_errors("corinfomax_tf.detect", common, cases, ENV, ROOT)
