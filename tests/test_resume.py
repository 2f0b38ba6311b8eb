"""Every command that trains resumes exactly: killed after its first checkpoint and
rerun, it ends bitwise equal to a run never interrupted (--deterministic, the CPU).
Pretraining's own kill and preemption tests are in test_train.py."""

import json
import os

import pytest

from tests import helpers

pytestmark = pytest.mark.slow


def _commands(export_dir):
  """(module, arguments, result file): a few tiny epochs of each command."""
  common = [f"--encoder={export_dir}", "--deterministic"]
  return {
      "linear_eval": ("corinfomax_tf.linear_eval", common + [
          "--dataset=digits", "--image_size=8", "--epochs=4", "--batch_size=128",
          "--eval_every_epochs=2", "--crop_min_scale=0.3"], "linear_eval.json",
          "--workdir"),
      "finetune": ("corinfomax_tf.finetune", common + [
          "--dataset=digits", "--image_size=8", "--label_fraction=0.1", "--epochs=4",
          "--batch_size=16", "--backbone_lr=0.02", "--head_lr=0.2", "--lr_decay_epochs=3",
          "--eval_every_epochs=2"], "finetune.json", "--workdir"),
      "detect": ("corinfomax_tf.detect", common + [
          "--image_size=32", "--num_train_images=32", "--num_test_images=8",
          "--batch_size=8", "--epochs=3", "--eval_every_epochs=3"], "detect.json",
          "--workdir"),
  }


def _flag(args, name):
  return int(next(a for a in args if a.startswith(f"--{name}=")).split("=")[1])


@pytest.mark.parametrize("name", ["linear_eval", "finetune", "detect"])
def test_killed_command_resumes_to_the_uninterrupted_result(trained, tmp_path, name):
  _, export_dir = trained
  module, args, result_file, workdir_flag = _commands(export_dir)[name]
  reference = str(tmp_path / "uninterrupted")
  result = helpers.run_command(module, *args, f"{workdir_flag}={reference}")
  assert result.returncode == 0, result.stderr[-3000:]

  workdir = str(tmp_path / "killed")
  proc = helpers.start_command(module, *args, f"{workdir_flag}={workdir}")
  left = helpers.kill_after_first_checkpoint(proc, workdir)
  epochs = _flag(args, "epochs")
  assert left and left[-1] < epochs, left          # killed before the end
  assert not os.path.exists(os.path.join(workdir, result_file))
  result = helpers.run_command(module, *args, f"{workdir_flag}={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints/ckpt-{left[-1]}" in result.stdout
  # Weights (the encoder's too when fine-tuned), optimizer slots and the epoch.
  helpers.assert_same_state(workdir, helpers.checkpoint_state(reference))
  with open(os.path.join(reference, result_file)) as fh:
    want = json.load(fh)
  with open(os.path.join(workdir, result_file)) as fh:
    got = json.load(fh)
  compared = [k for k in ("top1", "mAP", "history", "first_step_loss", "first_epoch_loss")
              if k in want]
  # Each command's headline figure and its history are compared, at the least.
  assert {"top1", "mAP"} & set(compared) and "history" in compared, compared
  assert set(got) == set(want), set(got) ^ set(want)
  for key in compared:
    assert got[key] == want[key], key
  every = _flag(args, "eval_every_epochs")
  assert got["epochs"] == epochs and got["encoder_step"] == 6
  assert [h["epoch"] for h in got["history"]] == [
      e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]
  assert os.listdir(os.path.join(workdir, "eval"))
  if name == "linear_eval":
    # A finished run is not trained again (the epoch lifecycle all three share).
    result = helpers.run_command(module, *args, f"{workdir_flag}={workdir}")
    assert result.returncode == 0 and "Already evaluated" in result.stdout
