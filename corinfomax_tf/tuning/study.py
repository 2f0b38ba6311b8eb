"""The Optuna side of a sweep: storage, sampler, pruner, and the study's checks.

    storage = open_storage(url, sweep_dir)     # one line for an unreachable URL
    study = open_study(storage, name, settings, sampler, pruner)

A study records the settings it was made with (`settings`: the search space, the
flags the trials share, the score and the validation split) in its user attributes;
reopening it with others is one ConfigError naming the first difference.
"""

import os
import re
import time

import optuna
from optuna.storages import journal

from corinfomax_tf import errors

SETTINGS_KEY = "corinfomax_sweep"
DEFAULT_DB = "study.db"


def default_url(sweep_dir):
  return "sqlite:///" + os.path.abspath(os.path.join(sweep_dir, DEFAULT_DB))


def shown_url(url):
  """The URL without a password (user:secret@host -> user:***@host)."""
  return re.sub(r"(//[^/:@]+:)[^@/]*@", r"\1***@", url)


def open_storage(url, sweep_dir):
  """The Optuna storage `url` names (empty: SQLite in the sweep directory), opened
  and checked now: a missing driver, a refused connection or a bad URL is one
  ConfigError naming --storage."""
  url = url or default_url(sweep_dir)
  shown = shown_url(url)
  if url.startswith("journal:"):
    path = url[len("journal:"):]
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
      raise errors.ConfigError(f"--storage={shown}: the folder {parent} does not exist")
    try:
      return optuna.storages.JournalStorage(journal.JournalFileBackend(path))
    except OSError as e:
      raise errors.ConfigError(f"--storage={shown}: cannot open the journal file "
                               f"({e.strerror})") from None
  if "://" not in url:
    raise errors.ConfigError(
        f"--storage={shown}: not a storage URL; give sqlite:///PATH, "
        "postgresql://USER@HOST/DB, mysql://USER@HOST/DB or journal:PATH")
  kwargs = {}
  if url.startswith("sqlite:"):
    path = url.split(":///", 1)[-1]
    parent = os.path.dirname(os.path.abspath(path)) if path else ""
    if parent and not os.path.isdir(parent):
      raise errors.ConfigError(f"--storage={shown}: the folder {parent} does not exist")
    # Several sweep processes write one file: wait for its lock instead of failing.
    kwargs = {"connect_args": {"timeout": 120}}
  try:
    return _rdb_storage(url, kwargs)
  except ModuleNotFoundError as e:
    raise errors.ConfigError(
        f"--storage={shown}: the database driver {e.name!r} is not installed (pip "
        f"install it: psycopg2-binary for PostgreSQL, PyMySQL for mysql+pymysql://)"
    ) from None
  except Exception as e:  # SQLAlchemy and the drivers raise many types
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"\(Background on this error.*", "", first)[:240]
    raise errors.ConfigError(f"--storage={shown}: cannot be opened ({type(e).__name__}: "
                             f"{first})") from None


# Two processes creating one new storage at once race between Optuna's "is the table
# there?" and its CREATE TABLE (or its first version row): the loser's error says so.
_CREATION_RACE = re.compile(r"already exists|UNIQUE constraint failed|duplicate key",
                            re.IGNORECASE)


def _rdb_storage(url, engine_kwargs, attempts=5):
  """Optuna's RDBStorage; a lost race to create a new storage's tables is retried
  (the other process made them)."""
  for attempt in range(attempts):
    try:
      return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as e:  # SQLAlchemy's errors: retried only for the creation race
      if attempt == attempts - 1 or not _CREATION_RACE.search(str(e)):
        raise
      time.sleep(0.2 * (attempt + 1))


class SeededPerTrial(optuna.samplers.BaseSampler):
  """TPE whose random numbers for trial n come from `seed + n`: a sweep's suggestions
  are reproducible, and two hosts asking at once never draw the same ones (one TPE
  seeded once per process would give both hosts the same first trials)."""

  def __init__(self, seed, startup_trials):
    self.seed = seed
    self.startup_trials = startup_trials
    self._current = self._make(seed)

  def _make(self, seed):
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials)

  def before_trial(self, study, trial):
    self._current = self._make(self.seed + trial.number)
    self._current.before_trial(study, trial)

  def infer_relative_search_space(self, study, trial):
    return self._current.infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    return self._current.sample_relative(study, trial, search_space)

  def sample_independent(self, study, trial, param_name, param_distribution):
    return self._current.sample_independent(study, trial, param_name, param_distribution)

  def after_trial(self, study, trial, state, values):
    self._current.after_trial(study, trial, state, values)


def make_pruner(name, *, after_epochs, startup_trials, max_epochs):
  if name == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                       n_warmup_steps=after_epochs)
  if name == "hyperband":
    return optuna.pruners.HyperbandPruner(min_resource=max(1, after_epochs),
                                          max_resource=max_epochs)
  return optuna.pruners.NopPruner()


def _first_difference(saved, current, path=""):
  """(key, saved value, current value) of the first difference, or None."""
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in sorted(set(saved) | set(current)):
      found = _first_difference(saved.get(key), current.get(key), f"{path}{key}.")
      if found:
        return found
    return None
  return None if saved == current else (path[:-1], saved, current)


def check_settings(saved, current, study_name, storage_url):
  """Refuses a study made with other settings: one line naming the first one."""
  found = _first_difference(saved, current)
  if not found:
    return
  key, before, now = found
  where = f"the study {study_name!r} in {shown_url(storage_url)}"
  if key == "search":
    raise errors.ConfigError(
        f"--search: {where} was made with another search space ({' '.join(before)}; "
        f"now {' '.join(now)}); use a new --study or --workdir, or the same --search "
        "values")
  name = key.split(".")[-1]
  raise errors.ConfigError(
      f"--{name}={_flag_text(now)}: {where} ran its trials with --{name}="
      f"{_flag_text(before)}; its scores would not compare. Use a new --study or "
      "--workdir, or the same value")


def _flag_text(value):
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  return "''" if value in ("", None) else str(value)


def open_study(storage, name, settings, sampler, pruner, storage_url):
  """The study `name` in `storage` (created on first use), checked against the
  settings it was made with."""
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                              pruner=pruner, direction="maximize", load_if_exists=True)
  saved = study.user_attrs.get(SETTINGS_KEY)
  if saved is None:
    study.set_user_attr(SETTINGS_KEY, settings)
  else:
    check_settings(saved, settings, name, storage_url)
  return study
