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

import tensorflow as tf  # noqa: E402

from corinfomax_tf.training import distribute  # noqa: E402

CPU_DEVICES = distribute.split_cpu(2)


def mirrored(devices):
  """A MirroredStrategy over `devices` whose collectives no other strategy of this
  process shares. Every MirroredStrategy numbers its collectives' group keys from the
  same start, so two strategies over the same devices in one process launch different
  collectives under the same keys, and the later one aborts ("Collective instance 100
  expected type 2 ... but got type 0"), depending on which tests a worker ran before.
  TensorFlow's own tests give each strategy a key base of its own (the class attribute
  `_collective_key_base`, "only set this in tests"); so do ours, and move the base on
  again after it, so that a strategy the package makes in this process (which reads
  the same attribute) gets one of its own too."""
  tf.distribute.MirroredStrategy._collective_key_base += 10_000
  strategy = tf.distribute.MirroredStrategy(devices)
  tf.distribute.MirroredStrategy._collective_key_base += 10_000
  return strategy


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
  # Then the tests by their measured duration, longest first (a name that no longer
  # exists only loses its place; the others keep their collection order).
  # pytest-xdist's worksteal gives each worker a contiguous part of this order, and an
  # idle worker takes the back half of a busy one's queue: the minute-long tests start
  # early, and a run ends on tests of under half a minute.
  items.sort(key=lambda item: (item.get_closest_marker("alone") is None,
                               -_expected_seconds(item.nodeid)))


def _expected_seconds(nodeid):
  return DURATIONS.get(nodeid, DURATIONS.get(nodeid.split("[")[0], 0))


# Seconds a test took (setup included: a shared fixture's maker pays for it), the
# longest of three suite runs (`--durations=80`, 2-core Intel Xeon, 2026-12-07); the
# tests of 15 s or more (the JAX train command as it is with the run's JAX compilation
# cache). A parametrised test without its brackets stands for all of its cases.
DURATIONS = {
    "tests/test_jax_backend.py::test_train_command_on_jax_resumes_exactly_exports_and_probes": 99,
    "tests/test_sweep.py::test_a_killed_sweep_reruns_to_the_uninterrupted_result": 123,
    "tests/test_stale_results.py::test_reruns_answer_for_the_encoder_and_images_they_are_given": 86,
    "tests/test_finetune.py::test_subset_is_class_balanced_and_reproducible_from_its_seed": 86,
    "tests/test_library.py::test_wheel_installed_in_a_folder_trains_a_vit_and_exports_it": 77,
    "tests/test_jax_backend.py::test_loss_terms_and_gradients_equal_tensorflows_in_float64[per_branch]": 71,
    "tests/test_library.py::test_mobilenet_from_its_config_pretrains_exports_and_evaluates": 69,
    "tests/test_jax_backend.py::test_training_steps_equal_tensorflows[resnet]": 68,
    "tests/test_fidelity.py::test_crop_sampler_draws_from_torchvisions_distribution[shape3]": 54,
    "tests/test_train.py::test_a_killed_worker_costs_only_the_work_since_the_last_checkpoint": 51,
    "tests/test_train.py::test_killed_run_resumes_to_the_uninterrupted_result": 49,
    "tests/test_sweep.py::test_two_processes_share_one_study_and_run_no_trial_twice": 46,
    "tests/test_resume.py::test_killed_command_resumes_to_the_uninterrupted_result[detect]": 45,
    "tests/test_train.py::test_extension_killed_midway_resumes_to_the_uninterrupted_result": 45,
    "tests/test_finetune.py::test_finetuning_an_export_changes_its_weights_and_lowers_the_loss": 43,
    "tests/test_export.py::test_the_preset_loads_in_keras_hub_on_every_backend[jax]": 41,
    "tests/test_finetune.py::test_bad_fractions_are_named": 40,
    "tests/test_export.py::test_tfsm_layer_wraps_the_export_as_a_trainable_keras_layer": 39,
    "tests/test_train.py::test_two_workers_match_one_process_on_the_same_global_batch": 36,
    "tests/test_finetune.py::test_command_writes_everything_resumes_and_names_bad_input": 35,
    "tests/test_train.py::test_sigterm_saves_mid_epoch_and_resumes_to_the_uninterrupted_result": 35,
    "tests/test_export.py::test_evaluation_commands_reject_mismatched_input": 34,
    "tests/test_train.py::test_disk_full_mid_run_keeps_the_last_checkpoint_and_resumes": 34,
    "tests/test_detection.py::test_retinanet_on_our_backbone_trains_and_gives_boxes": 33,
    "tests/test_train.py::test_rerun_resumes_and_a_finished_run_does_not_train_twice": 33,
    "tests/test_augment.py::test_resize_equals_tensorflows_antialiased_bicubic[316-316-224]": 33,
    "tests/test_library.py::test_the_readme_python_example_runs": 32,
    "tests/test_runtimes.py::test_a_vit_exports_to_both_runtimes": 28,
    "tests/test_export.py::test_linear_eval_and_knn_beat_chance_on_generated_images": 26,
    "tests/test_train.py::test_mixed_precision_and_xla_keep_the_state_float64[args2]": 26,
    "tests/test_distribute.py::test_fit_on_two_replicas_matches_one_replica[shared]": 25,
    "tests/test_distribute.py::test_fit_on_two_replicas_matches_one_replica[per_branch]": 25,
    "tests/test_data.py::test_sharded_pipelines_together_give_exactly_the_global_batches[folder]": 25,
    "tests/test_benchmark.py::test_json_fields_xla_agreement_and_single_trace": 24,
    "tests/test_workdir.py::test_a_workdir_written_before_the_lifecycle_layer_resumes_and_exports": 24,
    "tests/test_reported_figures.py::test_an_extension_that_does_not_probe_again_says_its_probe_is_of_an_earlier_step": 24,
    "tests/test_resume.py::test_killed_command_resumes_to_the_uninterrupted_result[finetune]": 23,
    "tests/test_train.py::test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint": 23,
    "tests/test_stale_results.py::test_a_data_service_without_workers_says_so_and_honours_sigterm": 22,
    "tests/test_tracebacks.py::test_knn_eval_and_embed_on_a_cut_encoder_onnx_are_one_line": 22,
    "tests/test_distribute.py::test_fused_batch_norm_on_two_replicas_trains_as_the_keras_layer": 22,
    "tests/test_data_service.py::test_training_feeds_from_a_dispatcher_and_two_worker_processes": 22,
    "tests/test_workdir.py::test_the_command_refuses_a_locked_workdir_then_survives_a_stale_lock_and_a_damaged_checkpoint": 22,
    "tests/test_distribute.py::test_two_replicas_give_the_one_replica_gradients": 21,
    "tests/test_reported_figures.py::test_a_run_preempted_mid_epoch_reports_the_uninterrupted_final_terms": 21,
    "tests/test_sweep.py::test_the_python_api_sweeps_unlabeled_images_on_the_effective_rank": 21,
    "tests/test_runtimes.py::test_the_smoke_export_runs_in_onnxruntime_and_litert_as_the_savedmodel": 21,
    "tests/test_sweep.py::test_a_sweep_writes_its_trials_table_results_and_a_best_flagfile": 21,
    "tests/test_export.py::test_bad_export_input_is_named_and_nothing_is_overwritten": 21,
    "tests/test_sweep.py::test_a_collapsing_trial_is_pruned_with_its_reason": 21,
    "tests/test_sweep.py::test_each_score_equals_a_knn_eval_of_the_trials_export_on_the_split": 21,
    "tests/test_resume.py::test_killed_command_resumes_to_the_uninterrupted_result[linear_eval]": 21,
    "tests/test_monitoring.py::test_a_real_tensorboard_server_lists_the_run": 20,
    "tests/test_own_data.py::test_pretraining_on_an_unlabeled_tree_with_monitors_and_an_eval_set": 19,
    "tests/test_train.py::test_short_run_on_generated_images_writes_everything": 19,
    "tests/test_data.py::test_sharded_pipelines_together_give_exactly_the_global_batches[digits]": 19,
    "tests/test_distribute.py::test_a_non_finite_gradient_stops_the_run_before_any_save[2-1]": 18,
    "tests/test_data.py::test_sharded_pipelines_together_give_exactly_the_global_batches[images]": 18,
    "tests/test_train.py::test_mixed_precision_and_xla_keep_the_state_float64[args1]": 18,
    "tests/test_train.py::test_mixed_precision_and_xla_keep_the_state_float64[args0]": 18,
    "tests/test_export.py::test_the_preset_loads_in_keras_hub_on_every_backend[tensorflow]": 17,
    "tests/test_train.py::test_loss_spike_guard_stops_before_the_save": 17,
    "tests/test_detection.py::test_command_resumes_writes_results_and_names_bad_input": 17,
    "tests/test_distribute.py::test_keras_data_conventions_train_on_batch_evaluate_and_fit": 17,
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
