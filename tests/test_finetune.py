"""Semi-supervised fine-tuning: label subsets, the library loop, the command."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf.data import datasets as data
from corinfomax_tf.export import saved_model as export_lib
from corinfomax_tf.downstream import finetune
from corinfomax_tf.data import label_subsets
from corinfomax_tf import config
from corinfomax_tf.evaluation import probes
from tests import helpers
from corinfomax_tf import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def run_cli(*args, timeout=300):
  return helpers.run([sys.executable, "-m", "corinfomax_tf.finetune", *args],
                        capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def test_subset_is_class_balanced_and_reproducible_from_its_seed():
  labels = np.repeat(np.arange(4), [50, 30, 20, 11])
  a = label_subsets.balanced_subset(labels, 0.1, seed=3, num_classes=4)
  np.testing.assert_array_equal(np.bincount(labels[a]), [5, 3, 2, 1])
  np.testing.assert_array_equal(a, label_subsets.balanced_subset(labels, 0.1, 3, 4))
  assert not np.array_equal(a, label_subsets.balanced_subset(labels, 0.1, 4, 4))
  assert len(set(a)) == len(a) and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(label_subsets.balanced_subset(labels, 1.0, 0, 4),
                                np.arange(len(labels)))


@pytest.mark.parametrize("fraction, needle", [
    (0.0, "--label_fraction=0.0: must be in (0, 1]"),
    (1.5, "--label_fraction=1.5: must be in (0, 1]"),
    (0.01, "--label_fraction=0.01: leaves class 2 with no example (it has 20"),
])
def test_bad_fractions_are_named(fraction, needle):
  labels = np.repeat(np.arange(3), [100, 100, 20])
  with pytest.raises(errors.ConfigError) as info:
    label_subsets.balanced_subset(labels, fraction, 0, 3)
  assert needle in str(info.value)


def test_subset_is_written_reread_and_disjoint_from_the_test_split(tmp_path):
  root = helpers.write_image_folder(str(tmp_path / "images"), classes=3, per_class=10)
  source = data.load_source("folder", image_size=8, data_dir=root)
  labels = finetune.train_labels(source)
  workdir = str(tmp_path / "run")
  first = label_subsets.subset_for_workdir(workdir, labels, 0.3, 7, 3)
  np.testing.assert_array_equal(np.bincount(labels[first]), [3, 3, 3])
  with open(os.path.join(workdir, label_subsets.SUBSET_FILE)) as fh:
    saved = json.load(fh)
  assert saved["indices"] == first.tolist() and saved["per_class"] == [3, 3, 3]
  np.testing.assert_array_equal(
      label_subsets.subset_for_workdir(workdir, labels, 0.3, 7, 3), first)
  with pytest.raises(errors.ConfigError, match="--subset_seed: .*seed=7 \\(now 8\\)"):
    label_subsets.subset_for_workdir(workdir, labels, 0.3, 8, 3)
  chosen = {source.scans[0].paths[i] for i in first}
  test_paths = set(source.scans[1].paths)
  assert chosen and not chosen & test_paths
  assert all(os.sep + "train" + os.sep in p for p in chosen)


def _mean_loss(encoder, head, metadata, source, indices):
  mean = tf.constant(metadata["normalization"]["mean"])
  std = tf.constant(metadata["normalization"]["std"])
  mask = np.zeros(source.num_train, bool)
  mask[indices] = True
  ds = source.train.enumerate().filter(lambda i, ex: tf.gather(tf.constant(mask), i))
  ds = probes.eval_images(ds.map(lambda i, ex: ex), metadata["image_size"])
  losses = []
  for images, labels in ds:
    feature_map = encoder((images - mean) / std, training=False)
    logits = head(tf.reduce_mean(feature_map, axis=(1, 2)))
    losses.append(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits).numpy())
  return float(np.concatenate(losses).mean())


def test_finetuning_an_export_changes_its_weights_and_lowers_the_loss(trained, tmp_path):
  _, export_dir = trained
  encoder, metadata = export_lib.load_trainable_encoder(export_dir)
  before = [v.numpy().copy() for v in encoder.trainable_variables]
  source = data.load_source("digits", image_size=8)
  workdir = str(tmp_path / "ft")
  # 108 steps: with 36 steps of 16 the eval-mode loss below had not fallen yet.
  cfg = config.FinetuneConfig(
      encoder=export_dir, workdir=workdir, data=config.DataConfig(image_size=8),
      label_fraction=0.1, epochs=6, batch_size=8, backbone_lr=0.02, head_lr=0.2,
      lr_decay_epochs=(4,), eval_every_epochs=3, crop_min_scale=0.5)
  result = finetune.run_finetune(encoder, metadata, source, cfg, log=lambda line: None)
  after = [v.numpy() for v in encoder.trainable_variables]
  changed = sum(not np.array_equal(a, b) for a, b in zip(before, after))
  assert changed == len(before)
  assert result["num_labelled"] == 145 and result["epochs"] == 6
  assert [h["epoch"] for h in result["history"]] == [3, 6]
  assert 0 <= result["top1"] <= 100
  assert result["last_epoch_loss"] < result["first_step_loss"]
  # The loss on the labelled images, measured the same way (no augmentation, BatchNorm
  # frozen) before fine-tuning (export + the head's initial weights) and after.
  import keras
  with open(os.path.join(workdir, "label_subset.json")) as fh:
    indices = np.asarray(json.load(fh)["indices"])
  fresh, _ = export_lib.load_trainable_encoder(export_dir)
  keras.utils.set_random_seed(0)  # run_finetune's head starts from this seed too
  untrained_head = keras.layers.Dense(10)
  untrained_head.build((None, fresh.feature_dim))
  trained_head = keras.layers.Dense(10)
  trained_head.build((None, encoder.feature_dim))
  tf.train.Checkpoint(head=trained_head).restore(
      tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))).expect_partial()
  loss_after = _mean_loss(encoder, trained_head, metadata, source, indices)
  loss_before = _mean_loss(fresh, untrained_head, metadata, source, indices)
  print(f"labelled-set loss before {loss_before:.4f}, after {loss_after:.4f}")
  assert loss_after < loss_before


def test_command_writes_everything_resumes_and_names_bad_input(trained, tmp_path):
  _, export_dir = trained
  workdir = str(tmp_path / "ft")
  common = [f"--encoder={export_dir}", "--dataset=digits", "--image_size=8",
            "--label_fraction=0.1", "--batch_size=16", "--backbone_lr=0.02", "--head_lr=0.2",
            "--lr_decay_epochs=2", f"--workdir={workdir}", "--eval_every_epochs=1"]
  # Resuming (killed, rerun) is tested for every command in test_resume.py.
  result = run_cli(*common, "--epochs=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "145 labelled training images" in result.stdout
  with open(os.path.join(workdir, "finetune.json")) as fh:
    out = json.load(fh)
  assert out["epochs"] == 1 and out["init"] == "pretrained" and out["encoder_step"] == 6
  assert [h["epoch"] for h in out["history"]] == [1]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[0] == "checkpoint"
  assert os.listdir(os.path.join(workdir, "eval"))

  not_ours = str(tmp_path / "plain_savedmodel")
  tf.saved_model.save(tf.Module(), not_ours)
  cases = [
      ([f"--encoder={not_ours}"], f"--encoder={not_ours}: not a corinfomax_tf encoder export"),
      (["--label_fraction=1.5"], "--label_fraction=1.5: must be in (0, 1]"),
      (["--label_fraction=0.001", f"--workdir={tmp_path}/other"],
       "--label_fraction=0.001: leaves class 0 with no example"),
      (["--subset_seed=5"], "--subset_seed: the workdir"),
      (["--dataset=images", f"--data_dir={helpers.write_image_tree(str(tmp_path / 'p'), 4)}",
        f"--workdir={tmp_path}/own"], "--dataset=images: has no labels; this command "
       "needs a labelled set"),
  ]
  helpers.assert_one_line_errors("corinfomax_tf.finetune", common, cases, ENV, ROOT)
