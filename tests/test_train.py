"""The training command end to end, in subprocesses: outputs, resume, bad input."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.cfg")


def train(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return helpers.run([sys.executable, "-m", "corinfomax_tf.train", *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def checkpoints(workdir):
  return sorted(int(p.rsplit("-", 1)[1].split(".")[0])
                for p in glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")))


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as fh:
    return json.load(fh)


def event_tags(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
  acc.Reload()
  return acc


def test_short_run_on_generated_images_writes_everything(tmp_path):
  data_dir = helpers.write_image_folder(str(tmp_path / "images"), classes=2, per_class=12)
  for name, payload in (("garbage.jpg", b"\xff\xd8 not a jpeg"), ("notes.txt", b"x")):
    with open(os.path.join(data_dir, "train", "class_0", name), "wb") as fh:
      fh.write(payload)
  workdir = str(tmp_path / "run")
  result = train(f"--flagfile={SMOKE}", "--dataset=folder", f"--data_dir={data_dir}",
                 "--normalization=imagenet", "--batch_size=8", "--steps_per_epoch=2",
                 f"--workdir={workdir}", "--probe_epochs=20", "--online_probe",
                 "--knn_every_epochs=1", "--knn_k=3,10")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "2 skipped: 1 not_an_image, 1 unreadable" in result.stdout
  with open(os.path.join(workdir, "data_report.json")) as fh:
    report = json.load(fh)[os.path.join(data_dir, "train")]
  assert report["kept"] == 24 and report["skipped"]["unreadable"]["count"] == 1
  assert report["skipped"]["unreadable"]["files"][0]["path"].endswith("garbage.jpg")
  assert checkpoints(workdir) == [2, 4]
  s = summary(workdir)
  assert s["step"] == 4 and s["total_steps"] == 4
  assert set(s["final_terms"]) >= {"loss", "attraction", "cov", "logdet1", "logdet2"}
  assert s["images_per_second"] > 0
  assert 0 <= s["probe"]["top1"] <= 100
  assert set(s["knn"]) == {"k3_top1", "k10_top1"}
  assert "probe_top1" in s["final_terms"] and "probe_loss" in s["final_terms"]
  eval_tags = event_tags(os.path.join(workdir, "eval")).Tags()["tensors"]
  assert {"knn/k3_top1", "knn/k10_top1", "probe/top1"} <= set(eval_tags)
  acc = event_tags(os.path.join(workdir, "train"))
  tags = acc.Tags()["tensors"]
  for tag in ("loss/total", "loss/attraction", "loss/cov", "optim/learning_rate",
              "online_probe/top1"):
    assert tag in tags
  logged = [e.step for e in acc.Tensors("loss/total")]
  assert logged == [1, 2, 3, 4]
  with open(os.path.join(workdir, "flags.cfg")) as fh:
    flagfile = fh.read()
  assert f"--data_dir={data_dir}" in flagfile and "--batch_size=8" in flagfile
  with open(os.path.join(workdir, "config.json")) as fh:
    assert json.load(fh)["model"]["width"] == 4


def test_rerun_resumes_and_a_finished_run_does_not_train_twice(tmp_path):
  workdir = str(tmp_path / "run")
  first = train(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--epochs=1")
  assert first.returncode == 0, first.stderr[-3000:]
  assert checkpoints(workdir) == [3]
  # Another length or batch on a trained workdir: one line naming the flag, both
  # values and the ways out; nothing trained.
  for args, needle in [
      (["--epochs=2"], "--epochs=2: the workdir %s was trained with --epochs=1; its "
       "learning-rate schedule was made for that length. Use a new --workdir, or the same "
       "value and --extend_epochs=1 to train 1 more epochs on" % workdir),
      (["--batch_size=32"], "--batch_size=32: the workdir %s was trained with "
       "--batch_size=16; use a new --workdir, or give the same value" % workdir),
      ]:
    refused = train(f"--flagfile={workdir}/flags.cfg", *args)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("error: " + needle), \
        refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and "Epoch" not in refused.stdout
  assert checkpoints(workdir) == [3]
  # Training longer is explicit: it says its schedule and records it.
  longer = train(f"--flagfile={workdir}/flags.cfg", "--extend_epochs=1")
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert ("Extension 1: epoch 2 (steps 4-6), learning rate constant 1e-06 (--min_lr, "
          "where the schedule ends" in longer.stdout)
  assert "Resumed from" in longer.stdout and "Epoch 2/2" in longer.stdout
  assert "Epoch 1/2" not in longer.stdout
  assert checkpoints(workdir) == [3, 6] and summary(workdir)["step"] == 6
  assert summary(workdir)["epochs"] == 2 and summary(workdir)["extensions"] == [
      dict(epochs=1, steps=[4, 6], lr_start=1e-6, lr_end=1e-6)]
  with open(os.path.join(workdir, "config.json")) as fh:
    assert json.load(fh)["train"]["extend_epochs"] == ["1"]
  mtime = os.path.getmtime(os.path.join(workdir, "checkpoints", "ckpt-6.index"))
  again = train(f"--flagfile={workdir}/flags.cfg")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Already trained: step 6 of 6" in again.stdout
  assert "Epoch" not in again.stdout
  assert os.path.getmtime(os.path.join(workdir, "checkpoints", "ckpt-6.index")) == mtime


def _final_state(workdir):
  """Every saved tensor of the latest checkpoint (weights, mu/R, optimizer, step)."""
  import tensorflow as tf
  reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if not k.startswith("_CHECKPOINTABLE") and "save_counter" not in k}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A deterministic 8-epoch run, never interrupted: the reference for resumes."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  result = train(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--epochs=8",
                 "--steps_per_epoch=2", "--deterministic", "--probe_epochs=0")
  assert result.returncode == 0, result.stderr[-3000:]
  return _final_state(workdir)


def _assert_same_state(workdir, reference):
  import numpy as np
  state = _final_state(workdir)
  assert set(state) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)


def _start(workdir):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  args = [sys.executable, "-m", "corinfomax_tf.train", f"--flagfile={SMOKE}",
          f"--workdir={workdir}", "--epochs=8", "--steps_per_epoch=2", "--deterministic",
          "--probe_epochs=0"]
  return helpers.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=ROOT)


def _wait_for_checkpoint(workdir, proc, timeout=240):
  deadline = time.time() + timeout
  while not checkpoints(workdir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  done = checkpoints(workdir)
  assert done and done[-1] < 16, done
  result = train(f"--flagfile={workdir}/flags.cfg")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints/ckpt-{done[-1]}" in result.stdout
  assert checkpoints(workdir)[-1] == 16 and summary(workdir)["step"] == 16
  # Weights, mu/R, optimizer momentum and step equal an uninterrupted run's, bitwise.
  _assert_same_state(workdir, uninterrupted)


def test_sigterm_saves_mid_epoch_and_resumes_to_the_uninterrupted_result(tmp_path,
                                                                        uninterrupted):
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  _wait_for_checkpoint(workdir, proc)
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  if proc.returncode == 0:
    pytest.skip("the run finished before the signal arrived")
  assert proc.returncode == 143, err[-2000:]
  assert "preempted: stopped by signal SIGTERM: checkpoint saved at step" in err
  saved = int(err.split("checkpoint saved at step ")[1].split()[0])
  assert checkpoints(workdir)[-1] == saved
  result = train(f"--flagfile={workdir}/flags.cfg")
  assert result.returncode == 0, result.stderr[-3000:]
  assert summary(workdir)["step"] == 16
  _assert_same_state(workdir, uninterrupted)


def test_extension_killed_midway_resumes_to_the_uninterrupted_result(tmp_path):
  """4 epochs, then 4 more on a new cosine: the extension killed midway and rerun
  ends bitwise equal to the extension run without a stop."""
  import shutil
  common = [f"--flagfile={SMOKE}", "--epochs=4", "--steps_per_epoch=2", "--deterministic",
            "--probe_epochs=0"]
  reference = str(tmp_path / "reference")
  assert train(*common, f"--workdir={reference}").returncode == 0
  assert checkpoints(reference)[-1] == 8
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  result = train(*common, f"--workdir={reference}", "--extend_epochs=4@0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  assert summary(reference)["step"] == 16

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = helpers.popen(
      [sys.executable, "-m", "corinfomax_tf.train", *common, f"--workdir={workdir}",
       "--extend_epochs=4@0.02"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=env, cwd=ROOT)
  deadline = time.time() + 240
  while checkpoints(workdir)[-1] <= 8 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  done = checkpoints(workdir)
  assert 8 < done[-1] < 16, done
  result = train(*common, f"--workdir={workdir}", "--extend_epochs=4@0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints/ckpt-{done[-1]}" in result.stdout
  assert "Extension 1: epochs 5-8 (steps 9-16), learning rate a cosine from 0.02 to " \
      "1e-06" in result.stdout
  _assert_same_state(workdir, _final_state(reference))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  assert train(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--epochs=1").returncode == 0
  before = open(os.path.join(workdir, "checkpoints", "checkpoint")).read()
  result = train(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--epochs=1",
                 "--extend_epochs=2@1e30")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "after step" in last and workdir in last
  assert checkpoints(workdir) == [3]
  assert open(os.path.join(workdir, "checkpoints", "checkpoint")).read() == before


def test_loss_spike_guard_stops_before_the_save(tmp_path):
  # The smoke run's loss rises by about 3% from its first five steps to the sixth
  # (13.51 median, 13.96): a factor just above 1 must stop it there, before the
  # epoch-end checkpoint of step 6.
  workdir = str(tmp_path / "run")
  result = train(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--probe_epochs=0",
                 "--loss_spike_factor=1.0001", "--loss_spike_window=5")
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: loss ") and " at step 6 is over --loss_spike_factor=" \
      "1.0001 times the median " in last and "is kept" in last, last
  assert checkpoints(workdir) == [3]


@pytest.mark.parametrize("args, needle", [
    (["--no_such_flag=1"], "no_such_flag"),
    (["--projector=2048-x-64"], "--projector=2048-x-64"),
    (["--la_R=1.0"], "--la_R=1.0: must be in [0, 1)"),
    (["--la_mu=-0.5"], "--la_mu=-0.5"),
    (["--eps=0"], "--eps=0.0: must be > 0"),
    (["--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=15"],
     "--batch_size=15: not divisible by the 2 replicas"),
    (["--dataset=folder", "--data_dir=/nonexistent/images"],
     "--data_dir: directory '/nonexistent/images' does not exist"),
    (["--dataset=cifar10", "--tfds_data_dir=@TMP@"], "--dataset=cifar10: not prepared"),
    (["--blur_prob=0.5,0.5,0.5"], "--blur_prob=0.5,0.5,0.5"),
    (["--flagfile=@TMP@/contradictory.cfg"], "--epochs is set to '1' at"),
])
def test_bad_input_gets_one_clear_line_before_training(tmp_path, args, needle):
  workdir = str(tmp_path / "run")
  (tmp_path / "contradictory.cfg").write_text("--epochs=1\n--lr=0.1\n--epochs=2\n")
  args = [a.replace("@TMP@/contradictory", str(tmp_path / "contradictory"))
           .replace("@TMP@", str(tmp_path / "tfds")) for a in args]
  result = train(f"--flagfile={SMOKE}", f"--workdir={workdir}", *args, timeout=120)
  assert result.returncode != 0
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert needle in lines[-1], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not checkpoints(workdir)


@pytest.mark.parametrize("args", [["--mixed_precision=bfloat16"],
                                  ["--mixed_precision=float16"],
                                  ["--jit_compile"]])
def test_mixed_precision_and_xla_keep_the_state_float64(tmp_path, args):
  import numpy as np
  import tensorflow as tf
  workdir = str(tmp_path / "run")
  result = train(f"--flagfile={SMOKE}", f"--workdir={workdir}", "--probe_epochs=0", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  s = summary(workdir)
  assert s["step"] == 6   # skipped float16 updates still count as steps
  assert all(np.isfinite(v) for v in s["final_terms"].values())
  reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
  dtypes = reader.get_variable_to_dtype_map()
  state = {k: v for k, v in dtypes.items() if k.startswith("loss_state/")}
  assert len(state) == 5 and all(v == tf.float64 for v in state.values())  # + R12
  R1 = reader.get_tensor("loss_state/R1/.ATTRIBUTES/VARIABLE_VALUE")
  assert not np.allclose(R1, np.eye(R1.shape[0]))  # the state was updated


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_workers(workdir, *args, ports=None):
  """Two MultiWorkerMirroredStrategy workers on loopback, configured by TF_CONFIG."""
  ports = ports or [_free_port(), _free_port()]
  cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
  procs = []
  for index in range(2):
    tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=tf_config)
    procs.append(helpers.popen(
        [sys.executable, "-m", "corinfomax_tf.train", f"--flagfile={SMOKE}",
         f"--workdir={workdir}", "--strategy=multi_worker", "--probe_epochs=0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
  return procs, ports


def _assert_workers_agree(workdir):
  import numpy as np
  import tensorflow as tf
  chief = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
  other = tf.train.load_checkpoint(os.path.join(workdir, "tmp_workers", "worker_1"))
  for name in ("R1", "mu2", "R12"):
    key = f"loss_state/{name}/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(chief.get_tensor(key), other.get_tensor(key))


@pytest.mark.alone
def test_two_workers_match_one_process_on_the_same_global_batch(tmp_path):
  """Two worker processes vs one process with two replicas: same data, same result."""
  import numpy as np
  import tensorflow as tf
  workers_dir, single_dir = str(tmp_path / "workers"), str(tmp_path / "single")
  # An image folder: each worker reads and decodes only its own files.
  images = helpers.write_image_folder(str(tmp_path / "images"), per_class=12)
  data_flags = ["--dataset=folder", f"--data_dir={images}", "--deterministic"]
  procs, _ = _launch_workers(workers_dir, *data_flags)
  single = helpers.popen(
      [sys.executable, "-m", "corinfomax_tf.train", f"--flagfile={SMOKE}",
       f"--workdir={single_dir}", "--strategy=mirrored", "--num_cpu_devices=2",
       "--probe_epochs=0", *data_flags],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  outputs = [p.communicate(timeout=300) for p in procs + [single]]
  for p, (out, err) in zip(procs + [single], outputs):
    assert p.returncode == 0, err[-3000:]
  assert "Epoch 2/2: 3 steps" in outputs[0][0]   # the chief reports progress
  _assert_workers_agree(workers_dir)
  s = summary(workers_dir)
  assert s["replicas"] == 2 and s["step"] == 6
  assert checkpoints(workers_dir) == [3, 6]

  a = tf.train.load_checkpoint(os.path.join(workers_dir, "checkpoints"))
  b = tf.train.load_checkpoint(os.path.join(single_dir, "checkpoints"))
  keys = [k for k in a.get_variable_to_shape_map()
          if k.startswith(("encoder/", "projector/", "loss_state/", "optimizer/"))
          and "VARIABLE_VALUE" in k]
  assert len(keys) > 50 and set(keys) <= set(b.get_variable_to_shape_map())
  worst = 0.0
  for key in keys:
    x, y = a.get_tensor(key), b.get_tensor(key)
    if x.dtype.kind != "f":
      np.testing.assert_array_equal(x, y, err_msg=key)
      continue
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=key)
    worst = max(worst, float(np.max(np.abs(x - y))))
  loss_w, loss_s = s["final_terms"]["loss"], summary(single_dir)["final_terms"]["loss"]
  assert loss_w == pytest.approx(loss_s, rel=1e-5)
  print(f"two workers vs one process, {len(keys)} tensors after 6 steps: max |diff| "
        f"{worst:.2e}; final loss {loss_w!r} vs {loss_s!r}")


@pytest.mark.alone
def test_a_killed_worker_costs_only_the_work_since_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  procs, ports = _launch_workers(workdir, "--epochs=4")
  deadline = time.time() + 240
  while not checkpoints(workdir) and time.time() < deadline:
    time.sleep(0.05)
  procs[1].kill()
  _, err = procs[0].communicate(timeout=240)
  procs[1].communicate()
  last = err.strip().splitlines()[-1]
  assert procs[0].returncode == 75, err[-2000:]
  assert last.startswith("error: a worker was lost after step ") and "is kept" in last, last
  assert "Traceback" not in err
  kept = checkpoints(workdir)
  assert kept and kept[-1] < 12
  # The scheduler restarts both workers with the same command.
  procs, _ = _launch_workers(workdir, "--epochs=4", ports=ports)
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert f"Resumed from {os.path.join(workdir, 'checkpoints', f'ckpt-{kept[-1]}')}" in \
      outputs[0][0]
  assert summary(workdir)["step"] == 12
  _assert_workers_agree(workdir)


def test_disk_full_mid_run_keeps_the_last_checkpoint_and_resumes(tmp_path):
  # A real write failure: once the first checkpoint exists, the running process may
  # no longer grow any file beyond 4 KiB (RLIMIT_FSIZE, with SIGXFSZ ignored so the
  # write fails with an error instead of killing it), as on a full disk.
  import resource
  workdir = str(tmp_path / "run")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  args = [sys.executable, "-m", "corinfomax_tf.train", f"--flagfile={SMOKE}",
          f"--workdir={workdir}", "--epochs=4", "--probe_epochs=0"]
  proc = helpers.popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
  deadline = time.time() + 240
  while not checkpoints(workdir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (4096, 4096))
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 2, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: the checkpoint of step 6 could not be written"), last
  assert "the last good checkpoint" in last and "ckpt-3) is kept" in last
  assert checkpoints(workdir) == [3]
  with open(os.path.join(workdir, "checkpoints", "checkpoint")) as fh:
    assert 'model_checkpoint_path: "ckpt-3"' in fh.read()
  # Space is back: the same command resumes from step 3 and finishes.
  result = train(*args[3:])
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Resumed from" in result.stdout and summary(workdir)["step"] == 12
