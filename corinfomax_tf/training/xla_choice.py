"""Whether the training step is compiled with XLA, decided by measurement.

Which step is faster depends on the CPU (on a 2-core AVX2 EPYC, XLA's step was 1.28x
the uncompiled one; on a 2-core AVX-512 machine 0.59x), the model and the batch, so
nothing is guessed from the CPU's name. In order:

1. `--jit_compile` / `--nojit_compile` (`jit_compile=True/False`): as given;
2. the workdir's earlier choice (`jit_compile.json`): a resumed or extended run keeps
   the numerics it started with (XLA's results differ from the uncompiled step's in
   the last bits);
3. a run too short to gain what measuring costs (fewer than `MIN_STEPS` steps), a
   backbone passed as a Python object (the timing builds its own model), several
   workers or the tf.data service: uncompiled;
4. this machine's remembered measurement for the same model, batch, image size and
   precision (`~/.cache/corinfomax_tf/jit_compile.json`; `CORINFOMAX_CACHE` moves it);
5. otherwise both steps are timed (`benchmarking.training_step.time_train_step`, a
   model of its own on a random batch of the per-replica size: one warm-up and
   `STEPS` timed steps each, about a minute for ResNet-18 at 32 px on 2 cores), and
   XLA is used where its step takes at most `1 / MARGIN` of the other's.

The choice and its figures are logged in one line and written to the workdir.
"""

import dataclasses
import hashlib
import json
import os
import platform

import tensorflow as tf

from corinfomax_tf.atomic_files import write_json_atomic
from corinfomax_tf.benchmarking import training_step

CHOICE_FILE = "jit_compile.json"
MIN_STEPS = 500
STEPS = 2
# XLA must be this much faster to be chosen: a near-tie keeps the uncompiled step
# (the one the fidelity tests compare with the authors').
MARGIN = 1.05


def cache_path():
  root = os.environ.get("CORINFOMAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "corinfomax_tf")
  return os.path.join(root, CHOICE_FILE)


def machine_key(cfg, per_replica_batch):
  """What a measurement holds for: this CPU (and GPUs), TensorFlow's version, the
  start-up settings that change the step's speed (threads, oneDNN, its instruction
  set, XLA's flags) and the step's shape (model, loss dimension, batch, image size,
  precision)."""
  cpu = training_step.cpuinfo_fields() or {}
  features = cpu.get("flags", cpu.get("Features", ""))
  gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
  what = {"cpu": cpu.get("model name", platform.processor() or platform.machine()),
          "features": hashlib.sha1(features.encode()).hexdigest()[:12],
          "cores": os.cpu_count(), "gpus": gpus, "tensorflow": tf.__version__,
          "settings": training_step.speed_settings(),
          "model": dataclasses.asdict(cfg.model), "loss": dataclasses.asdict(cfg.loss),
          "batch": per_replica_batch, "image_size": cfg.data.image_size,
          "mixed_precision": cfg.train.mixed_precision}
  return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path):
  try:
    with open(path) as fh:
      return json.load(fh)
  except (OSError, ValueError):
    return None


def measure(cfg, per_replica_batch):
  """{"no_xla": s/step, "xla": s/step} of the real step, on a model of its own."""
  out = {}
  for key, jit in (("no_xla", False), ("xla", True)):
    run = training_step.time_train_step(cfg, per_replica_batch, STEPS, 1, jit)
    out[key] = run["seconds_per_step"]
  return out


def decide(seconds):
  return seconds["xla"] * MARGIN <= seconds["no_xla"]


def describe(choice):
  how = choice["how"]
  verdict = "on" if choice["jit_compile"] else "off"
  if "seconds" in choice:
    s = choice["seconds"]
    figures = (f"{1000 * s['xla']:.0f} ms/step with XLA, {1000 * s['no_xla']:.0f} ms "
               f"without")
    where = "measured now" if how == "measured" else "measured earlier on this machine"
    return (f"XLA for the training step: {verdict} ({figures}, {where}; "
            "--jit_compile/--nojit_compile decide it)")
  return f"XLA for the training step: {verdict} ({choice['why']})"


def choose(cfg, workdir, *, total_steps, per_replica_batch, measurable=True, why_not="",
           chief=True, measure_fn=measure):
  """The choice {"jit_compile": bool, "how": ..., "why" or "seconds"}, written to the
  workdir (by the chief) so that a resumed run keeps it."""
  given = cfg.train.jit_compile
  if given is not None:
    return {"jit_compile": bool(given), "how": "given",
            "why": f"--{'' if given else 'no'}jit_compile"}
  saved = workdir.read_json(CHOICE_FILE)
  if saved is not None and workdir.has_checkpoints():
    return {**saved, "how": "earlier run",
            "why": "as this workdir's first run chose, so that it resumes bitwise"}
  if not measurable:
    choice = {"jit_compile": False, "how": "not measured", "why": why_not}
  elif total_steps < MIN_STEPS:
    choice = {"jit_compile": False, "how": "not measured",
              "why": f"a run of {total_steps} steps: too short to gain what timing both "
                     f"steps costs, from {MIN_STEPS} steps on"}
  else:
    key = machine_key(cfg, per_replica_batch)
    remembered = (_read_json(cache_path()) or {}).get(key)
    if remembered is not None:
      choice = {"jit_compile": decide(remembered), "how": "remembered",
                "seconds": remembered}
    else:
      seconds = measure_fn(cfg, per_replica_batch)
      choice = {"jit_compile": decide(seconds), "how": "measured", "seconds": seconds}
      _remember(key, seconds)
  if chief:
    workdir.write_json(CHOICE_FILE, choice)
  return choice


def _remember(key, seconds):
  path = cache_path()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    known = _read_json(path) or {}
    known[key] = seconds
    write_json_atomic(path, known, indent=1, sort_keys=True)
  except OSError:
    pass   # a read-only home: the measurement is simply not remembered
