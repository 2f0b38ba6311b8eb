"""The workdir layer: lock, stale lock, damaged checkpoints, free space, results."""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import tensorflow as tf

from corinfomax_tf import errors
from corinfomax_tf.training import workdir as workdir_lib
from tests import helpers

HOLD = ("import sys, time\n"
        "from corinfomax_tf.training import workdir\n"
        "w = workdir.Workdir(sys.argv[1], command='holder').open()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


def _hold(path):
  """A process holding the workdir's lock until killed."""
  proc = helpers.popen([sys.executable, "-c", HOLD, path], stdout=subprocess.PIPE,
                          text=True, env=helpers.ENV, cwd=helpers.ROOT)
  assert proc.stdout.readline().strip() == "locked"
  return proc


@pytest.mark.slow
def test_a_live_holder_stops_a_second_process_and_a_dead_one_is_taken_over(tmp_path):
  path = str(tmp_path / "run")
  holder = _hold(path)
  # What the holder recorded (independently of the messages under test).
  with open(os.path.join(path, ".lock")) as fh:
    started = json.load(fh)["started"]
  try:
    with pytest.raises(errors.WorkdirError) as info:
      workdir_lib.Workdir(path, command="second").open()
    message = str(info.value)
    assert f"--workdir={path}: in use by another live process (host " in message
    assert f"pid {holder.pid}, holder started " in message
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  lines = []
  wd = workdir_lib.Workdir(path, command="third", log=lines.append).open()
  assert lines == [f"Taking over the lock of {path}: its holder (host {os.uname()[1]}, "
                   f"pid {holder.pid}, holder started {started}) is gone"]
  wd.close()
  # Released cleanly: the next one takes it without a word.
  lines.clear()
  workdir_lib.Workdir(path, log=lines.append).open().close()
  assert lines == []


def _variables():
  return tf.Variable(tf.zeros([64, 64])), tf.Variable(0, dtype=tf.int64)


def _damage(workdir, number, how):
  if how == "index":
    path = os.path.join(workdir, "checkpoints", f"ckpt-{number}.index")
  else:
    path = glob.glob(os.path.join(workdir, "checkpoints", f"ckpt-{number}.data-*"))[0]
  size = os.path.getsize(path)
  with open(path, "r+b") as fh:
    if how == "flip":
      fh.seek(size // 2)
      byte = fh.read(1)
      fh.seek(size // 2)
      fh.write(bytes([byte[0] ^ 0xFF]))
    else:
      fh.truncate(size // 2 if how == "truncate" else 10)


@pytest.mark.parametrize("how", ["truncate", "flip", "index"])
def test_restore_falls_back_to_the_newest_intact_checkpoint(tmp_path, how):
  path = str(tmp_path / "run")
  weights, step = _variables()
  with workdir_lib.Workdir(path) as wd:
    ckpts = wd.checkpoints(tf.train.Checkpoint(w=weights, step=step), keep=3)
    for number in (3, 6, 9):
      weights.assign(tf.fill([64, 64], float(number)))
      step.assign(number)
      ckpts.save(number)
  _damage(path, 9, how)
  lines = []
  weights, step = _variables()
  with workdir_lib.Workdir(path, log=lines.append) as wd:
    ckpts = wd.checkpoints(tf.train.Checkpoint(w=weights, step=step), keep=3)
    assert ckpts.restore_latest() == os.path.join(path, "checkpoints", "ckpt-6")
    assert int(step.numpy()) == 6 and float(weights[0, 0]) == 6.0
    assert lines[0].startswith(f"warning: checkpoint {path}/checkpoints/ckpt-9 cannot be "
                               "read (")
    assert lines[1] == (f"warning: moved the damaged checkpoint ckpt-9 to "
                        f"{path}/checkpoints/damaged")
    # The step of the damaged checkpoint is trained and saved again.
    assert not ckpts.saved_at(9)
    ckpts.save(9)
    ckpts.save(12)
    ckpts.save(15)
  assert helpers.checkpoint_numbers(path) == [9, 12, 15]
  assert os.listdir(os.path.join(path, "checkpoints", "damaged"))


def test_no_intact_checkpoint_is_one_line(tmp_path):
  path = str(tmp_path / "run")
  weights, step = _variables()
  with workdir_lib.Workdir(path) as wd:
    ckpts = wd.checkpoints(tf.train.Checkpoint(w=weights, step=step), keep=3)
    ckpts.save(3)
  _damage(path, 3, "truncate")
  with workdir_lib.Workdir(path, log=lambda line: None) as wd:
    ckpts = wd.checkpoints(tf.train.Checkpoint(w=weights, step=step), keep=3)
    with pytest.raises(errors.WorkdirError, match=r"no intact checkpoint in .*checkpoints "
                       r"\(1 damaged, newest .*ckpt-3\): move the checkpoints away"):
      ckpts.restore_latest()


@pytest.mark.slow
def test_the_command_refuses_a_locked_workdir_then_survives_a_stale_lock_and_a_damaged_checkpoint(
    tmp_path):
  """Pretraining end to end: a second process on a live workdir is refused before any
  work; after its holder died (the lock left behind) and the newest checkpoint was
  cut in half (a failing disk), the rerun takes the lock over, warns, trains the lost
  epoch again from the previous checkpoint and finishes."""
  path = str(tmp_path / "run")
  args = [f"--flagfile={helpers.SMOKE}", f"--workdir={path}", "--probe_epochs=0"]
  result = helpers.run_command("corinfomax_tf.train", *args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert helpers.checkpoint_numbers(path) == [3, 6]
  holder = _hold(path)
  try:
    result = helpers.run_command("corinfomax_tf.train", *args, "--extend_epochs=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir={path}: in use by another live process (host ")
    assert "Traceback" not in result.stderr and helpers.checkpoint_numbers(path) == [3, 6]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  _damage(path, 6, "truncate")
  result = helpers.run_command("corinfomax_tf.train", *args, "--extend_epochs=1")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"Taking over the lock of {path}: its holder" in result.stdout
  assert (f"warning: checkpoint {path}/checkpoints/ckpt-6 cannot be read (Read less bytes "
          "than requested); trying the previous one") in result.stdout
  assert f"Resumed from {path}/checkpoints/ckpt-3" in result.stdout
  assert "Epoch 2/3" in result.stdout and "Traceback" not in result.stderr
  assert "Exception ignored" not in result.stderr
  assert helpers.checkpoint_numbers(path) == [3, 6, 9]


def test_too_little_free_space_is_refused_before_training(tmp_path):
  wd = workdir_lib.Workdir(str(tmp_path), lock=False)
  with pytest.raises(errors.WorkdirError, match=r"--workdir=.*: 10 MiB free, the run "
                     r"needs about 464 MiB \(4 checkpoints of 100 MiB and logs\)"):
    wd.check_free_space(100 * 2**20, keep=3, free_bytes=10 * 2**20)
  wd.check_free_space(100 * 2**20, keep=3, free_bytes=500 * 2**20)


def test_an_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(errors.WorkdirError, match=r"--workdir=.*file/run: cannot write there"):
    workdir_lib.Workdir(str(blocker / "run")).open()


def test_results_are_written_whole(tmp_path):
  wd = workdir_lib.Workdir(str(tmp_path), lock=False)
  wd.write_json("result.json", {"top1": 1.5})
  assert wd.read_json("result.json") == {"top1": 1.5}
  assert wd.read_json("missing.json") is None
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(errors.WorkdirError, match="bad.json: not valid JSON"):
    wd.read_json("bad.json")


@pytest.mark.slow
def test_a_workdir_written_before_the_lifecycle_layer_resumes_and_exports(tmp_path):
  """tests/fixtures/workdir_275a4f4: checkpoints of the previous layout's code."""
  import shutil
  path = str(tmp_path / "old")
  shutil.copytree(os.path.join(helpers.ROOT, "tests", "fixtures", "workdir_275a4f4"), path)
  export_dir = str(tmp_path / "export")
  result = helpers.run([sys.executable, "export/export_encoder.py", f"--workdir={path}",
                           f"--export_dir={export_dir}"], capture_output=True, text=True,
                          env=helpers.ENV, cwd=helpers.ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Exported step 6" in result.stdout and "reload check passed" in result.stdout
  result = helpers.run_command("corinfomax_tf.train", f"--flagfile={path}/flags.cfg",
                               f"--workdir={path}", "--extend_epochs=1")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"Resumed from {path}/checkpoints/ckpt-6" in result.stdout
  assert "Epoch 3/3" in result.stdout and "Epoch 2/3" not in result.stdout
  assert helpers.checkpoint_numbers(path) == [9]


def test_a_downstream_resume_with_other_settings_is_refused_naming_the_flag(tmp_path):
  import dataclasses

  from corinfomax_tf import config
  from corinfomax_tf.training import epochs
  cfg = config.LinearEvalConfig(encoder="runs/x/export", workdir=str(tmp_path),
                                data=config.DataConfig())

  def start(c):
    with epochs.EpochRun.open(c, command="t", result_file="r.json", flag="--workdir",
                              log=lambda line: None):
      pass
  start(cfg)
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "ckpt-1.index").write_bytes(b"")
  # Where the data is found, whether it may be downloaded, how files are checked: free.
  start(dataclasses.replace(cfg, epochs=200, data=dataclasses.replace(
      cfg.data, tfds_download=True, image_check="full")))
  with pytest.raises(errors.ConfigError, match=r"--lr=0.5: the workdir .* was trained "
                     r"with lr=0.2; use a new --workdir or the same value"):
    start(dataclasses.replace(cfg, lr=0.5))
  with pytest.raises(errors.ConfigError, match=r"--image_size=64: the workdir"):
    start(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=64)))


def test_a_file_system_without_locks_is_one_line(tmp_path, monkeypatch):
  import errno
  import fcntl

  def no_locks(fh, operation):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_locks)
  with pytest.raises(errors.WorkdirError, match=r"--workdir=.*: cannot be locked \(No locks "
                     r"available\); use a workdir on a file system with locks"):
    workdir_lib.Workdir(str(tmp_path / "run")).open()
