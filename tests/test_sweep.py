"""The hyperparameter sweep: its search space and checks (quick), and tiny sweeps on
digits run as a user runs them (slow): results, best.cfg, a kill and rerun, two
processes on one study, a collapsing trial, bad input."""

import json
import os
import signal
import sqlite3
import time

import numpy as np
import pytest

from corinfomax_tf import errors
from corinfomax_tf import flags as flags_lib
from corinfomax_tf.data import datasets
from corinfomax_tf.tuning import space
from corinfomax_tf.tuning import study as study_lib
from corinfomax_tf.tuning import sweep as sweep_lib

import helpers

DEFAULTS = flags_lib.defaults()


# ----------------------------------------------------------------------------
# Quick: the space, the validation split, the storage and the study's checks.
# ----------------------------------------------------------------------------


def test_search_specs_parse_to_typed_parameters():
  p = space.parse("alpha:log:50:2000", DEFAULTS)
  assert (p.name, p.kind, p.low, p.high) == ("alpha", "log", 50.0, 2000.0)
  # An integer flag searched on a continuous scale becomes an integer parameter.
  assert space.parse("warmup_epochs:uniform:0:10", DEFAULTS).kind == "int"
  assert space.parse("warmup_epochs:log:1:10", DEFAULTS).kind == "int_log"
  c = space.parse("projector_out:choice:32,64,128", DEFAULTS)
  assert c.choices == (32, 64, 128)
  assert space.parse("covariance:choice:shared,per_branch", DEFAULTS).choices == (
      "shared", "per_branch")
  assert space.parse("l2_normalize:choice:true,false", DEFAULTS).choices == (True, False)
  assert space.parse(p.spec(), DEFAULTS) == p


@pytest.mark.parametrize("spec, needle", [
    ("alpah:log:50:2000", "unknown parameter 'alpah'"),
    ("la_r:log:0.001:0.1", "did you mean la_R?"),
    ("alpha:log:2000:50", "the range is reversed"),
    ("alpha:uniform:5:5", "the range is empty"),
    ("lr:log:0:1", "a log scale needs bounds > 0"),
    ("alpha:normal:1:2", "unknown kind 'normal'"),
    ("alpha:log:1", "expected alpha:log:LOW:HIGH"),
    ("alpha", "expected NAME:KIND:LOW:HIGH"),
    ("projector_out:choice:", "no values to choose from"),
    ("projector_out:choice:64,x", "'x' is not a int"),
    ("workdir:choice:a,b", "set by the sweep itself"),
    ("covariance:log:1:2", "is not a number"),
    ("alpha:int:1:5", "is not an integer"),
    ("alpha:log:1:inf", "bounds must be finite"),
])
def test_bad_search_specs_are_one_line_naming_the_value(spec, needle):
  with pytest.raises(errors.ConfigError) as e:
    space.parse(spec, DEFAULTS)
  assert str(e.value).startswith(f"--search={spec}: ") and needle in str(e.value), e.value


def test_a_parameter_searched_twice_or_none_at_all_is_refused():
  with pytest.raises(errors.ConfigError, match="alpha is searched twice"):
    space.parse_all(["alpha:log:1:2", "alpha:log:3:4"], DEFAULTS)
  with pytest.raises(errors.ConfigError, match="no parameter to search"):
    space.parse_all([], DEFAULTS)


def test_a_range_end_the_train_command_refuses_is_refused_before_any_trial():
  values = dict(DEFAULTS, workdir="unused")
  with pytest.raises(errors.ConfigError, match=r"--search=momentum:uniform:0.5:1: 1.0 is "
                     r"not a valid value \(--momentum=1.0: must be in \[0, 1\)\)"):
    sweep_lib.sweep_config(values, ["momentum:uniform:0.5:1"])
  cfg = sweep_lib.sweep_config(values, ["momentum:uniform:0.5:0.99"], n_trials=4)
  assert cfg.n_trials == 4 and cfg.search[0].high == 0.99
  with pytest.raises(errors.ConfigError, match="--n_trials=0: must be >= 1"):
    sweep_lib.sweep_config(values, ["alpha:log:1:2"], n_trials=0)


def test_projector_out_changes_only_the_last_width():
  values = space.apply({"projector": "512-512-64", "alpha": 1.0},
                       {"projector_out": 128, "alpha": 3.0})
  assert values == {"projector": "512-512-128", "alpha": 3.0}


def test_the_validation_split_is_seeded_disjoint_and_complete():
  held = datasets.holdout_indices(100, 0.2, seed=3)
  assert len(held) == 20 and np.all(np.diff(held) > 0)
  assert np.array_equal(held, datasets.holdout_indices(100, 0.2, seed=3))
  assert not np.array_equal(held, datasets.holdout_indices(100, 0.2, seed=4))
  with pytest.raises(errors.ConfigError, match="--validation_fraction=0.001: holds out 0"):
    datasets.holdout_indices(100, 0.001, seed=0)
  source = datasets.digits_source(8)
  split, held = datasets.holdout(source, 0.2, seed=0)
  rest = np.stack([x.numpy() for x, _ in split.train])
  validation = np.stack([x.numpy() for x, _ in split.test])
  everything = np.stack([x.numpy() for x, _ in source.train])
  assert (split.num_train, split.num_test) == (len(rest), len(validation)) == (
      source.num_train - len(held), len(held))
  assert np.array_equal(validation, everything[held])
  kept = np.setdiff1d(np.arange(source.num_train), held)
  assert np.array_equal(rest, everything[kept])


def test_the_validation_split_of_a_folder_is_taken_before_decoding(tmp_path):
  root = helpers.write_image_folder(str(tmp_path / "data"), classes=2, per_class=5)
  source = datasets.folder_source(root, "train", "test")
  split, held = datasets.holdout(source, 0.3, seed=1)
  paths = [p.numpy().decode() for p, _ in split.train_encoded]
  all_paths = [p.numpy().decode() for p, _ in source.train_encoded]
  assert len(paths) == 7 and len(held) == 3
  assert sorted(paths + [all_paths[i] for i in held]) == sorted(all_paths)
  assert len(list(split.test)) == 3


def test_a_lost_race_to_create_a_new_storage_is_retried(tmp_path, monkeypatch):
  # Two hosts starting on one new database: the second CREATE TABLE fails with
  # "already exists" (seen in CI with two sweep processes); the retry finds the tables.
  import optuna
  real, calls = optuna.storages.RDBStorage, []

  def racing(url, **kwargs):
    calls.append(url)
    if len(calls) == 1:
      real(url, **kwargs)   # "the other process" creates the tables
      raise RuntimeError("(sqlite3.OperationalError) table trials already exists")
    return real(url, **kwargs)
  monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
  storage = study_lib.open_storage("", str(tmp_path))
  assert len(calls) == 2 and storage.get_all_studies() == []
  monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: (_ for _ in ()).throw(
      RuntimeError("disk I/O error")))
  with pytest.raises(errors.ConfigError, match="cannot be opened .*disk I/O error"):
    study_lib.open_storage(f"sqlite:///{tmp_path}/other.db", str(tmp_path))


@pytest.mark.parametrize("url, needle", [
    ("nonsense", "not a storage URL"),
    ("sqlite:////no/such/folder/x.db", "the folder /no/such/folder does not exist"),
    ("journal:/no/such/folder/j.log", "the folder /no/such/folder does not exist"),
    ("postgresql://user:secret@127.0.0.1:1/db", "--storage=postgresql://user:***@"),
])
def test_a_storage_that_cannot_be_opened_is_one_line(tmp_path, url, needle):
  with pytest.raises(errors.ConfigError) as e:
    study_lib.open_storage(url, str(tmp_path))
  assert needle in str(e.value) and "secret" not in str(e.value), e.value


def test_a_journal_file_is_a_storage_many_hosts_can_share(tmp_path):
  url = f"journal:{tmp_path / 'journal.log'}"
  opened = [study_lib.open_study(study_lib.open_storage(url, str(tmp_path)), "j",
                                 {"search": ["a:log:1:2"]}, study_lib.SeededPerTrial(0, 2),
                                 study_lib.make_pruner("none", after_epochs=0,
                                                       startup_trials=0, max_epochs=1), url)
            for _ in range(2)]   # two processes' views of one study
  trial = opened[0].ask()
  opened[0].tell(trial, 1.0)
  assert [t.value for t in opened[1].get_trials()] == [1.0]


def test_a_study_made_with_other_settings_is_refused(tmp_path):
  storage = study_lib.open_storage("", str(tmp_path))
  settings = {"search": ["alpha:log:1:2"], "fixed": {"epochs": 3}}

  def open_with(s):
    return study_lib.open_study(storage, "s", s, study_lib.SeededPerTrial(0, 2),
                                study_lib.make_pruner("none", after_epochs=0,
                                                      startup_trials=0, max_epochs=3),
                                "sqlite:///x")
  open_with(settings)
  open_with(json.loads(json.dumps(settings)))   # the same: accepted
  with pytest.raises(errors.ConfigError, match=r"^--search: the study 's' in sqlite:///x "
                     r"was made with another search space \(alpha:log:1:2; now "
                     r"alpha:log:1:3\)"):
    open_with({**settings, "search": ["alpha:log:1:3"]})
  with pytest.raises(errors.ConfigError, match=r"^--epochs=4: the study 's' .* ran its "
                     r"trials with --epochs=3"):
    open_with({**settings, "fixed": {"epochs": 4}})


def test_suggestions_depend_on_the_seed_and_trial_number_not_the_process():
  import optuna

  def first_values(seed, count=3):
    study = optuna.create_study(sampler=study_lib.SeededPerTrial(seed, 10),
                                direction="maximize")
    out = []
    for _ in range(count):
      trial = study.ask()
      out.append(trial.suggest_float("x", 1.0, 2.0, log=True))
      study.tell(trial, 0.0)
    return out
  a, b = first_values(0), first_values(0)
  assert a == b and len(set(a)) == 3
  assert first_values(1) != a


# ----------------------------------------------------------------------------
# Slow: tiny sweeps on digits, run as a user runs them.
# ----------------------------------------------------------------------------

TINY = [f"--flagfile={helpers.SMOKE}", "--epochs=3", "--knn_every_epochs=1",
        "--deterministic", "--noexport_runtimes", "--probe_epochs=0",
        "--preview_images=0", "--verbose=0", "--search=alpha:log:10:200",
        "--search=lr:log:0.01:0.2", "--notest_best"]


def sweep(workdir, *args, **kwargs):
  return helpers.run_command("corinfomax_tf.sweep", *TINY, f"--workdir={workdir}", *args,
                             **kwargs)


def study_trials(workdir):
  with sqlite3.connect(os.path.join(workdir, "study.db")) as db:
    return db.execute("select number, state from trials order by number").fetchall()


def read_json(*parts):
  with open(os.path.join(*parts)) as fh:
    return json.load(fh)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A 3-trial sweep run once for the whole test run (every pytest-xdist worker shares
  it), uninterrupted, with every trial exported. Tests only read it."""

  def make(folder):
    workdir = os.path.join(folder, "s")
    result = sweep(workdir, "--n_trials=3", "--export", "--test_best", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [workdir, result.stdout]

  return tuple(helpers.shared_once(tmp_path_factory, "swept", make))


@pytest.mark.slow
def test_a_sweep_writes_its_trials_table_results_and_a_best_flagfile(swept, tmp_path):
  workdir, out = swept
  result = read_json(workdir, "sweep.json")
  assert [t["number"] for t in result["trials"]] == [0, 1, 2]
  assert all(t["state"] == "complete" for t in result["trials"])
  assert result["trials"][0]["given"]   # trial 0 runs the flags' own values
  assert result["trials"][0]["params"] == {"alpha": 50.0, "lr": 0.05}
  for t in result["trials"]:
    assert os.path.isfile(os.path.join(t["workdir"], "summary.json"))
    assert t["score"] == read_json(t["workdir"], "summary.json")["knn"]["k20_top1"]
    assert len(t["intermediate"]) == 3
  best = max(result["trials"], key=lambda t: t["score"])
  assert result["best"]["number"] == best["number"]
  assert result["validation"]["count"] == 287 and result["validation"]["seed"] == 0
  # The table, the test figure of the best trial only, the plots, HParams.
  assert "trial  state     k20_top1  alpha  lr" in out and "<- best" in out
  assert result["test"]["trial"] == best["number"] and result["test"]["num_test"] == 360
  assert "Test split, best trial only" in out
  for name in ("optimization_history", "param_importances", "slice"):
    assert os.path.getsize(os.path.join(workdir, f"{name}.png")) > 5000
  assert os.listdir(os.path.join(workdir, "hparams"))
  # best.cfg trains (on all the training images) with the train command.
  text = open(os.path.join(workdir, "best.cfg")).read()
  assert f"--alpha={best['params']['alpha']}" in text and "--lr=" in text
  trained = helpers.run_command("corinfomax_tf.train",
                                f"--flagfile={os.path.join(workdir, 'best.cfg')}",
                                f"--workdir={tmp_path / 'best'}", "--noexport")
  assert trained.returncode == 0, trained.stderr[-3000:]
  summary = read_json(tmp_path / "best", "summary.json")
  assert summary["step"] == 9 and summary["knn"]


@pytest.mark.slow
def test_each_score_equals_a_knn_eval_of_the_trials_export_on_the_split(swept):
  workdir, _ = swept
  result = read_json(workdir, "sweep.json")
  v = result["validation"]
  procs = [(t, helpers.start_command(
      "corinfomax_tf.knn_eval", f"--encoder={t['workdir']}/export", "--dataset=digits",
      f"--validation_fraction={v['fraction']}", f"--validation_seed={v['seed']}",
      f"--workdir={t['workdir']}/knn_validation")) for t in result["trials"]]
  for t, proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    knn = read_json(t["workdir"], "knn_validation", "knn_eval.json")
    assert knn["num_test"] == v["count"]
    # The same encoder and images (the export takes uint8 pixels): within float noise,
    # i.e. at most one validation image of the 287 voted differently.
    assert abs(knn["k20_top1"] - t["score"]) <= 100 / v["count"] + 1e-9, (knn, t)


@pytest.mark.slow
def test_a_rerun_with_another_search_space_or_setting_is_one_line(swept):
  workdir, _ = swept
  other = helpers.run_command("corinfomax_tf.sweep", *TINY[:-3], "--search=alpha:log:10:300",
                              "--search=lr:log:0.01:0.2", f"--workdir={workdir}")
  assert other.returncode == 2 and "Traceback" not in other.stderr
  assert other.stderr.strip().splitlines()[-1].startswith(
      "error: --search: the study 's' in sqlite:///"), other.stderr[-800:]
  longer = sweep(workdir, "--epochs=4")
  assert longer.returncode == 2
  assert "error: --epochs=4: the study 's'" in longer.stderr and "--epochs=3" in longer.stderr


@pytest.mark.slow
def test_a_killed_sweep_reruns_to_the_uninterrupted_result(swept, tmp_path):
  reference, _ = swept
  workdir = str(tmp_path / "s")   # the same study name as the reference's
  proc = helpers.start_command("corinfomax_tf.sweep", *TINY, f"--workdir={workdir}",
                               "--n_trials=2", "--export")
  killed_in = os.path.join(workdir, "trials", "1")
  deadline = time.time() + 600
  while (not helpers.checkpoint_numbers(killed_in) and time.time() < deadline
         and proc.poll() is None):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert helpers.checkpoint_numbers(killed_in) == [3], "killed after its first epoch"
  assert study_trials(workdir) == [(0, "COMPLETE"), (1, "RUNNING")]
  first = os.path.join(workdir, "trials", "0", "summary.json")
  before = (open(first).read(), os.stat(first).st_mtime_ns)
  rerun = sweep(workdir, "--n_trials=2", "--export")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Trial 1 was left running by" in rerun.stdout
  assert "resuming it from its checkpoint" in rerun.stdout
  assert "Trial 0:" not in rerun.stdout and "Trial 2" not in rerun.stdout
  assert (open(first).read(), os.stat(first).st_mtime_ns) == before   # untouched
  assert study_trials(workdir) == [(0, "COMPLETE"), (1, "COMPLETE")]
  got = read_json(workdir, "sweep.json")["trials"]
  want = read_json(reference, "sweep.json")["trials"][:2]
  assert [t["params"] for t in got] == [t["params"] for t in want]
  assert [t["score"] for t in got] == [t["score"] for t in want]
  # The resumed trial's weights are bitwise those of the uninterrupted one.
  import tensorflow as tf
  a = tf.train.load_checkpoint(os.path.join(killed_in, "checkpoints"))
  b = tf.train.load_checkpoint(os.path.join(reference, "trials", "1", "checkpoints"))
  names = [n for n in a.get_variable_to_shape_map() if "save_counter" not in n]
  assert names and all(np.array_equal(a.get_tensor(n), b.get_tensor(n)) for n in names)


@pytest.mark.slow
def test_two_processes_share_one_study_and_run_no_trial_twice(tmp_path):
  workdir = str(tmp_path / "shared")
  # No trial exports; the best one is exported for its one test measurement.
  args = [*TINY, f"--workdir={workdir}", "--n_trials=3", "--epochs=1", "--noexport",
          "--test_best"]
  procs = [helpers.start_command("corinfomax_tf.sweep", *args) for _ in range(2)]
  outs = []
  for proc in procs:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    outs.append(out)
  assert study_trials(workdir) == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
  started = [[n for n in range(3) if f"Trial {n}: " in out or f"Trial {n} (resumed)"
              in out] for out in outs]
  assert sorted(started[0] + started[1]) == [0, 1, 2], started
  assert all(started), "both processes ran trials"
  result = read_json(workdir, "sweep.json")
  assert len({t["owner"]["pid"] for t in result["trials"]}) == 2
  test = read_json(workdir, "test.json")
  assert test["trial"] == result["best"]["number"] and test["num_test"] == 360
  assert os.path.isdir(os.path.join(result["best"]["workdir"], "export"))
  assert sum("Test split, best trial only" in out for out in outs) >= 1


@pytest.mark.slow
def test_a_collapsing_trial_is_pruned_with_its_reason(tmp_path):
  workdir = str(tmp_path / "c")
  result = helpers.run_command(
      "corinfomax_tf.sweep", *TINY[:-3], "--search=alpha:choice:1000000", "--notry_given",
      f"--workdir={workdir}", "--n_trials=1", "--monitor_every_steps=1", "--noexport")
  assert result.returncode == 0, result.stderr[-3000:]
  trial = read_json(workdir, "sweep.json")["trials"][0]
  assert trial["state"] == "pruned"
  assert trial["reason"].startswith("collapsed at step ") and "collapse" in trial["reason"]
  assert "Trial 0 pruned: collapsed at step" in result.stdout
  assert "No trial finished yet" in result.stdout


@pytest.mark.slow
def test_bad_sweep_input_is_one_line_before_any_trial(tmp_path):
  workdir = str(tmp_path / "bad")
  common = [f"--flagfile={helpers.SMOKE}", f"--workdir={workdir}"]
  helpers.assert_one_line_errors("corinfomax_tf.sweep", common, [
      (["--search=alphaa:log:1:2"], "unknown parameter 'alphaa'"),
      (["--search=alpha:log:2:1"], "the range is reversed"),
      (["--search=alpha:log:-1:2"], "a log scale needs bounds > 0"),
      (["--search=alpha:log:1:2", "--storage=postgresql://u:pw@127.0.0.1:1/db"],
       "--storage=postgresql://u:***@127.0.0.1:1/db:"),
      (["--search=alpha:log:1:2", "--storage=journal:/no/such/dir/j.log"],
       "the folder /no/such/dir does not exist"),
      ([], "--search: no parameter to search"),
  ], env=helpers.ENV, cwd=helpers.ROOT)
  assert not os.path.exists(os.path.join(workdir, "trials"))


@pytest.mark.slow
def test_the_python_api_sweeps_unlabeled_images_on_the_effective_rank(tmp_path):
  import tensorflow as tf

  import corinfomax_tf
  pixels = datasets.digits_arrays(8)[0][0][:400]
  lines = []
  result = corinfomax_tf.sweep(
      ["alpha:log:10:200"], workdir=str(tmp_path / "s"), n_trials=2,
      images=tf.data.Dataset.from_tensor_slices(pixels), log=lines.append,
      image_size=8, normalization="digits", width=4, projector="32-16", epochs=2,
      batch_size=16, steps_per_epoch=3, lr=0.05, warmup_epochs=1, probe_epochs=0,
      export=False, preview_images=0, verbose="0", deterministic=True)
  assert result["score"]["kind"] == "effective_rank" and result["validation"] is None
  assert any("needs no labels" in line for line in lines) and "test" not in result
  scores = [t["score"] for t in result["trials"]]
  assert [t["state"] for t in result["trials"]] == ["complete", "complete"]
  assert all(1.0 < s <= 16.0 for s in scores), scores   # D = 16
  assert len(result["trials"][0]["intermediate"]) == 2
  with pytest.raises(ValueError, match="Unknown settings \\['n_trails'\\]"):
    corinfomax_tf.sweep(["alpha:log:10:200"], workdir=str(tmp_path / "t"), n_trails=3)
  with pytest.raises(TypeError, match="search must be a list"):
    corinfomax_tf.sweep("alpha:log:10:200", workdir=str(tmp_path / "t"))
