"""A sweep's results: the table, sweep.json, best.cfg, the plots, the HParams config,
and the best trial's one measurement on the test split.

Every process that ends its loop writes them (atomically, under the sweep's ask
lock) from the study as it is then; the test split is measured once, by the first
process that finds the study complete, and recorded in test.json.
"""

import json
import os
import warnings

import matplotlib
import matplotlib.pyplot as plt
import optuna
import tensorflow as tf
from optuna.visualization import matplotlib as vis
from tensorboard.plugins.hparams import api as hp

from corinfomax_tf import flags as flags_lib
from corinfomax_tf.atomic_files import write_atomic
from corinfomax_tf.evaluation import knn
from corinfomax_tf.export import saved_model
from corinfomax_tf.tuning import study as study_lib

RESULT_FILE = "sweep.json"
BEST_FLAGFILE = "best.cfg"
TEST_FILE = "test.json"
PLOTS = ("optimization_history", "param_importances", "slice")


def _state(trial):
  return trial.state.name.lower()


def trial_rows(sweep):
  rows = []
  for t in sweep.study.get_trials(deepcopy=False):
    rows.append(dict(
        number=t.number, state=_state(t), score=t.value, params=dict(t.params),
        reason=t.user_attrs.get("reason"), workdir=os.path.join(sweep.dir, "trials",
                                                               str(t.number)),
        intermediate={str(k): v for k, v in sorted(t.intermediate_values.items())},
        owner=t.user_attrs.get("owner"), given=bool(t.user_attrs.get("given"))))
  return rows


def format_table(rows, params, score_key):
  """The printed table: one line per trial, best score marked."""
  best = max((r["score"] for r in rows if r["state"] == "complete"), default=None)
  header = ["trial", "state", score_key] + list(params)
  lines = [[str(r["number"]), r["state"],
            "-" if r["score"] is None else f"{r['score']:.4f}"] +
           [_cell(r["params"].get(p)) for p in params] for r in rows]
  widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
            for i, h in enumerate(header)]
  out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
  for r, line in zip(rows, lines):
    mark = "  <- best" if best is not None and r["score"] == best else ""
    reason = f"  ({r['reason']})" if r["reason"] and r["state"] != "complete" else ""
    given = "  (the given settings)" if r.get("given") else ""
    out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + mark
               + given + reason)
  return "\n".join(out)


def _cell(value):
  if value is None:
    return "-"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_flagfile(sweep, best):
  """The best trial's flags as a flagfile that trains on the whole training set."""
  values = sweep._trial_values(dict(best.params), best.number)
  values["workdir"] = os.path.join(sweep.dir, "best")
  params = ", ".join(f"{k}={_cell(v)}" for k, v in best.params.items())
  header = [
      f"# The best trial ({best.number}) of the sweep {sweep.study_name!r} in {sweep.dir}:",
      f"#   {params}",
      f"#   score {sweep.score_key} {best.value:.4f} ({sweep.score_what}).",
      "# Trials trained on the training images minus the validation split; this "
      "flagfile trains",
      "# on all of them:",
      f"#   corinfomax train --flagfile={os.path.join(sweep.dir, BEST_FLAGFILE)}",
  ]
  body = flags_lib.flagfile_text(values).splitlines()[1:]
  return "\n".join(header + body) + "\n"


def measure_test(sweep, best):
  """kNN top-1 of the best trial's encoder on the test split (bank: the whole
  training split), once per best trial; None where there is no labelled test split."""
  source = sweep.full_eval if sweep.full_eval is not None else sweep.full_source
  if sweep.score_kind != "knn" or not source.labelled or source.test is None:
    return None
  path = os.path.join(sweep.dir, TEST_FILE)
  if os.path.exists(path):
    with open(path) as fh:
      saved = json.load(fh)
    if saved.get("trial") == best.number:
      return saved
  workdir = sweep.trial_dir(best.number)
  export_dir = os.path.join(workdir, "export")
  if not saved_model.is_our_export(export_dir):
    saved_model.export_workdir(workdir, export_dir, overwrite=True, onnx=False,
                               litert=False, log=sweep.log)
  encoder = saved_model.load_encoder(export_dir)
  train = sweep.cfg.train
  result = knn.run_knn_eval(encoder, source, image_size=train["image_size"],
                            ks=tuple(int(k) for k in train["knn_k"]),
                            temperature=train["knn_temperature"])
  result.update(trial=best.number, encoder=export_dir,
                note="measured once, for the best trial only; not used for choosing")
  write_atomic(path, json.dumps(result, indent=2, sort_keys=True))
  return result


def write_plots(sweep, log):
  """PNG plots a person reads; a plot Optuna cannot draw yet is skipped with a line."""
  matplotlib.use("Agg")
  written = {}
  done = [t for t in sweep.study.get_trials(deepcopy=False)
          if t.state == optuna.trial.TrialState.COMPLETE]
  for name in PLOTS:
    if name == "param_importances" and (len(done) < 2 or len(sweep.cfg.search) < 2):
      log(f"Plot {name} skipped: needs 2 finished trials and 2 searched parameters")
      continue
    if not done:
      log(f"Plot {name} skipped: no finished trial yet")
      continue
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Optuna marks its matplotlib plots experimental
        ax = getattr(vis, f"plot_{name}")(sweep.study, target_name=sweep.score_key)
        figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        if name != "slice":
          figure.set_size_inches(8, 5)
          figure.tight_layout()
      path = os.path.join(sweep.dir, f"{name}.png")
      figure.savefig(path + ".tmp.png", dpi=100)
      os.replace(path + ".tmp.png", path)
      plt.close(figure)
      written[name] = path
    except Exception as e:  # noqa: BLE001  (Optuna's plots raise several types)
      log(f"Plot {name} skipped: {type(e).__name__}: {str(e)[:200]}")
  return written


def write_hparams_config(sweep):
  """The HParams dashboard's experiment: the searched parameters and the score."""
  hparams = []
  for p in sweep.cfg.search:
    if p.kind == "choice":
      hparams.append(hp.HParam(p.name, hp.Discrete(list(p.choices))))
    elif p.kind.startswith("int"):
      hparams.append(hp.HParam(p.name, hp.IntInterval(int(p.low), int(p.high))))
    else:
      hparams.append(hp.HParam(p.name, hp.RealInterval(float(p.low), float(p.high))))
  writer = tf.summary.create_file_writer(os.path.join(sweep.dir, "hparams"))
  with writer.as_default():
    hp.hparams_config(hparams=hparams, metrics=[
        hp.Metric("sweep/score", display_name=sweep.score_key)])
  writer.flush()


def write_results(sweep):
  """Everything above; returns the sweep.json dict. The caller holds the sweep's ask
  lock: processes write their results one after the other, each from the study as
  it is then, so the last one written is the newest."""
  study, log = sweep.study, sweep.log
  rows = trial_rows(sweep)
  params = [p.name for p in sweep.cfg.search]
  counted = [r for r in rows if r["state"] in ("complete", "pruned", "running",
                                                "waiting")]
  running = [r["number"] for r in rows if r["state"] == "running"]
  complete = len(counted) >= sweep.cfg.n_trials and not running
  finished = [r for r in rows if r["state"] == "complete"]
  result = dict(
      study=sweep.study_name, storage=study_lib.shown_url(sweep.storage_url),
      n_trials=sweep.cfg.n_trials, complete=complete, running=running,
      score=dict(name=sweep.score_key, kind=sweep.score_kind, what=sweep.score_what),
      search=[p.spec() for p in sweep.cfg.search], validation=sweep.validation,
      trials=rows, ran_here=sweep.ran)
  best = None
  if finished:
    best = study.best_trial
    result["best"] = dict(number=best.number, score=best.value, params=best.params,
                          workdir=sweep.trial_dir(best.number),
                          flagfile=os.path.join(sweep.dir, BEST_FLAGFILE))
    write_atomic(os.path.join(sweep.dir, BEST_FLAGFILE), best_flagfile(sweep, best))
  if best is not None and complete and sweep.cfg.test_best:
    test = measure_test(sweep, best)
    if test is not None:
      result["test"] = test
  write_hparams_config(sweep)
  result["plots"] = write_plots(sweep, log)
  write_atomic(os.path.join(sweep.dir, RESULT_FILE),
               json.dumps(result, indent=2, sort_keys=True))
  log(format_table(rows, params, sweep.score_key))
  if best is None:
    log("No trial finished yet" + (f"; trials {running} are running elsewhere"
                                   if running else ""))
  else:
    log(f"Best: trial {best.number}, {sweep.score_key} {best.value:.4f} on the "
        f"validation split; its flags: {result['best']['flagfile']}")
  if "test" in result:
    k = sweep.score_key
    log(f"Test split, best trial only (measured once, not used for choosing): {k} "
        f"{result['test'][k]:.2f}%")
  if not complete:
    log(f"The study has {len(counted)} of {sweep.cfg.n_trials} trials"
        + (f"; {len(running)} still running in other processes" if running else ""))
  log(f"Results: {os.path.join(sweep.dir, RESULT_FILE)}; TensorBoard: tensorboard "
      f"--logdir {sweep.dir}")
  return result
