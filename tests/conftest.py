"""Test set-up: the CPU split into two logical devices before TensorFlow starts.

Distribution tests run MirroredStrategy over "/cpu:0" and "/cpu:1"; every other test
runs on the default strategy (the first device).
"""

import os
import sys


def _threads_per_worker():
  """Under pytest-xdist, each worker's TensorFlow (and every command it starts) gets its
  share of the cores for its intra-op and inter-op pools, unless the user set them. By
  default every process sizes both pools to all the cores, so two workers, each with a
  training subprocess, oversubscribe a 2-core machine several times over. TensorFlow's
  spinning pool threads then take turns on the cores, and an in-process test that takes
  12 s alone took 110 s in the suite. Set before TensorFlow starts; the fork server and
  every command inherit it."""
  workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
  if workers < 2:
    return
  share = str(max(1, (os.cpu_count() or 1) // workers))
  for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(name, share)


_threads_per_worker()

from corinfomax_tf import quiet  # noqa: E402  (before the level below: it records the user's)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
quiet.start_tensorflow()   # TensorFlow's start-up lines off the test output

from corinfomax_tf.training import distribute  # noqa: E402

CPU_DEVICES = distribute.split_cpu(2)


import subprocess  # noqa: E402

import pytest  # noqa: E402

from tests import forkserver  # noqa: E402
from tests import helpers  # noqa: E402


def pytest_collection_modifyitems(items):
  # Every test that needs the smoke-trained export is slow (it trains one first).
  for item in items:
    if "trained" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.slow)
  # `alone` tests first: at the start the workers are not yet inside long tests, so
  # the others wait little for an `alone` test to begin (and its processes keep the
  # cores busy while they wait); later, a worker would sit idle until the other
  # worker's running test ended.
  # Then the longest tests (measured), so that no worker starts a minutes-long test
  # while the other has nothing left to take (a name that no longer exists only loses
  # its place).
  items.sort(key=lambda item: (item.get_closest_marker("alone") is None,
                               item.nodeid.split("[")[0] not in LONGEST))


# The longest tests of a run (`--durations=25` on a 2-core machine), started before the
# others (in collection order among themselves).
LONGEST = {
    "tests/test_jax_backend.py::test_train_command_on_jax_resumes_exactly_exports_and_probes",
    "tests/test_jax_backend.py::test_loss_terms_and_gradients_equal_tensorflows_in_float64",
    "tests/test_train.py::test_rerun_resumes_and_a_finished_run_does_not_train_twice",
    "tests/test_library.py::test_wheel_installed_in_a_folder_trains_a_vit_and_exports_it",
    "tests/test_train.py::test_extension_killed_midway_resumes_to_the_uninterrupted_result",
    "tests/test_sweep.py::test_a_killed_sweep_reruns_to_the_uninterrupted_result",
    "tests/test_train.py::test_short_run_on_generated_images_writes_everything",
    "tests/test_reported_figures.py::"
    "test_a_run_preempted_mid_epoch_reports_the_uninterrupted_final_terms",
    "tests/test_monitoring.py::test_a_real_tensorboard_server_lists_the_run",
    "tests/test_export.py::test_the_preset_loads_in_keras_hub_on_every_backend",
    "tests/test_train.py::test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint",
    "tests/test_benchmark.py::test_json_fields_xla_agreement_and_single_trace",
}


# The suite runs on pytest-xdist workers (pyproject's addopts: -n auto, at most 4). A
# test marked `alone` (several processes that must answer each other in time: two
# MultiWorkerMirroredStrategy workers miss the coordination service's 10 s heartbeat
# on a 2-core machine running another test's training beside them) runs with no
# other test: it takes an exclusive lock that every other test takes shared. Writers
# first: an `alone` test announces itself on a second lock, which new tests pass
# through, so that the others cannot keep it waiting.
@pytest.fixture(autouse=True)
def _alone_or_shared(request):
  run_uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not run_uid:   # not under xdist: every test is alone anyway
    yield
    return
  import fcntl
  import tempfile
  base = os.path.join(tempfile.gettempdir(), f"corinfomax-tests-{run_uid}")
  with open(base + ".gate", "a") as gate, open(base + ".run", "a") as run:
    if request.node.get_closest_marker("alone") is not None:
      fcntl.flock(gate, fcntl.LOCK_EX)
      fcntl.flock(run, fcntl.LOCK_EX)
    else:
      fcntl.flock(gate, fcntl.LOCK_SH)
      fcntl.flock(run, fcntl.LOCK_SH)
      fcntl.flock(gate, fcntl.LOCK_UN)
    try:
      yield
    finally:
      fcntl.flock(run, fcntl.LOCK_UN)
      fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def _jax_compilation_cache(tmp_path_factory):
  """The JAX processes of a run compile the same steps again (a run, then its resume in
  a new process): JAX's persistent compilation cache, one folder per run shared by
  every worker, lets the later ones load the executables the first compiled (the same
  code, so the same numbers): the JAX train command test alone took 132 s without it
  and 97 s with it on a 2-core Intel Xeon.
  A folder the user set is kept."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent   # the run's folder, which every worker sees
  folder = str(base / "jax-compilation-cache")
  for env in (os.environ, helpers.ENV):
    env["JAX_COMPILATION_CACHE_DIR"] = folder
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(autouse=True)
def _quick_tests_start_no_process(request, monkeypatch):
  """The quick loop (`-m "not slow"`) is subprocess-free: a test not marked slow that
  starts a process fails, naming the mark it lacks."""
  if request.node.get_closest_marker("slow") is not None:
    return

  def refuse(*args, **kwargs):
    raise AssertionError(f"{request.node.nodeid} starts a process ({args[:1]!r}) and is "
                         "not marked @pytest.mark.slow")
  monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
  monkeypatch.setattr(forkserver.ForkedProcess, "__init__", refuse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A smoke-trained workdir and its export, shared by the export, fine-tuning and
  detection tests (made once for the whole run; tests copy it before changing it)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

  def run(*args):
    return helpers.run([sys.executable, *args], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)

  def make(base):
    workdir = os.path.join(base, "run")
    result = run("-m", "corinfomax_tf.train", f"--flagfile={ROOT}/configs/smoke.cfg",
                 f"--workdir={workdir}", "--probe_epochs=0")
    assert result.returncode == 0, result.stderr[-3000:]
    export_dir = os.path.join(workdir, "export")
    result = run("export/export_encoder.py", f"--workdir={workdir}",
                 f"--export_dir={export_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reload check passed" in result.stdout
    return [workdir, export_dir]
  return tuple(helpers.shared_once(tmp_path_factory, "trained", make))
