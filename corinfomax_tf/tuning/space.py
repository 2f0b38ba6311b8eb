"""The search space of a sweep: one `--search=NAME:KIND:...` per parameter.

    --search=alpha:log:50:2000             a float, log-uniform in [50, 2000]
    --search=la_R:uniform:0.001:0.1        a float, uniform
    --search=warmup_epochs:int:0:10        an integer in [0, 10] (int_log: log scale)
    --search=projector_out:choice:64,128   one of the listed values

NAME is any pretraining setting by its flag name (`corinfomax train --helpfull`),
or `projector_out`, the projector's output size D (the last width of --projector).
Pure functions: parsing checks every bound before a trial starts; `suggest` asks an
Optuna trial for a value; `apply` puts the values into the train flags.
"""

import dataclasses
import math

from corinfomax_tf import errors

KINDS = ("log", "uniform", "int", "int_log", "choice")
# Parameters that are not one flag: name -> the flag they change.
DERIVED = {"projector_out": "projector"}
# Flags a trial cannot take from the space: the sweep owns them.
NOT_SEARCHABLE = ("workdir", "export_dir", "strategy", "num_cpu_devices",
                  "cluster_resolver", "slurm_port_base", "dataset", "data_dir",
                  "eval_dataset", "eval_data_dir", "extend_epochs", "preview_only",
                  "data_service")


@dataclasses.dataclass(frozen=True)
class Parameter:
  """One searched setting: `name` (a train flag, or `projector_out`), `kind` (one
  of KINDS), `low`/`high` for ranges, `choices` for a choice."""
  name: str
  kind: str
  low: float = None
  high: float = None
  choices: tuple = ()

  def spec(self):
    """The `--search` value this parameter was parsed from (normalised)."""
    if self.kind == "choice":
      return f"{self.name}:choice:{','.join(map(str, self.choices))}"
    return f"{self.name}:{self.kind}:{_number(self.low)}:{_number(self.high)}"

  def to_dict(self):
    return dataclasses.asdict(self)


def _number(value):
  return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _fail(spec, why):
  raise errors.ConfigError(f"--search={spec}: {why}")


def _convert(spec, text, default):
  """A choice's or a bound's text as the type of the flag's default."""
  try:
    if isinstance(default, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    _fail(spec, f"{text!r} is not a {type(default).__name__} (the type of --"
          f"{spec.split(':')[0]})")
  return text


def parse(spec, defaults):
  """A `Parameter` from `NAME:KIND:LOW:HIGH` or `NAME:choice:A,B,...`.

  `defaults`: {flag name: default} of the train command; a name not among them,
  a range that is empty or reversed, or a bound <= 0 on a log scale is one
  ConfigError naming the --search value.
  """
  parts = spec.split(":")
  if len(parts) < 3:
    _fail(spec, "expected NAME:KIND:LOW:HIGH or NAME:choice:A,B,... (KIND one of "
          f"{', '.join(KINDS)})")
  name, kind = parts[0].strip(), parts[1].strip()
  if name in NOT_SEARCHABLE:
    _fail(spec, f"--{name} is set by the sweep itself (or for the whole sweep), not "
          "searched")
  if name not in defaults and name not in DERIVED:
    close = sorted(n for n in defaults if n.lower() == name.lower() or
                   n.replace("_", "") == name.replace("_", ""))
    _fail(spec, f"unknown parameter {name!r}: a pretraining setting by its flag name "
          "(corinfomax train --helpfull) or projector_out"
          + (f"; did you mean {close[0]}?" if close else ""))
  if kind not in KINDS:
    _fail(spec, f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
  default = 64 if name == "projector_out" else defaults[name]
  if kind == "choice":
    values = [v.strip() for v in ":".join(parts[2:]).split(",") if v.strip()]
    if not values:
      _fail(spec, "no values to choose from")
    choices = tuple(_convert(spec, v, default) for v in values)
    if len(set(choices)) != len(choices):
      _fail(spec, "a value is listed twice")
    return Parameter(name, kind, choices=choices)
  if len(parts) != 4:
    _fail(spec, f"expected {name}:{kind}:LOW:HIGH")
  if isinstance(default, (bool, str, tuple)) or default is None:
    _fail(spec, f"--{name} is not a number; search it with {name}:choice:A,B,...")
  if isinstance(default, int) and kind in ("log", "uniform"):
    kind = "int_log" if kind == "log" else "int"
  if not isinstance(default, int) and kind in ("int", "int_log"):
    _fail(spec, f"--{name} is not an integer; use log or uniform")
  number = int if kind.startswith("int") else float
  try:
    low, high = number(parts[2]), number(parts[3])
  except ValueError:
    _fail(spec, f"bounds must be {'integers' if number is int else 'numbers'}")
  if not (math.isfinite(low) and math.isfinite(high)):
    _fail(spec, "bounds must be finite")
  if low >= high:
    _fail(spec, f"the range is {'empty' if low == high else 'reversed'} ({low} to "
          f"{high}): give LOW < HIGH")
  if kind in ("log", "int_log") and low <= 0:
    _fail(spec, f"a log scale needs bounds > 0 (LOW is {low})")
  return Parameter(name, kind, low=low, high=high)


def parse_all(specs, defaults):
  """The Parameters of every `--search` value; a name given twice is refused."""
  if not specs:
    raise errors.ConfigError("--search: no parameter to search; give at least one "
                             "(e.g. --search=alpha:log:50:2000)")
  params = [parse(spec, defaults) for spec in specs]
  seen = set()
  for p in params:
    if p.name in seen:
      raise errors.ConfigError(f"--search={p.spec()}: {p.name} is searched twice")
    seen.add(p.name)
  if "projector_out" in seen and "projector" in seen:
    raise errors.ConfigError("--search=projector_out: searched with --search=projector; "
                             "keep one")
  return params


def suggest(trial, param):
  """The value of `param` that the Optuna `trial` asks for."""
  if param.kind == "choice":
    return trial.suggest_categorical(param.name, list(param.choices))
  if param.kind in ("int", "int_log"):
    return trial.suggest_int(param.name, int(param.low), int(param.high),
                             log=param.kind == "int_log")
  return trial.suggest_float(param.name, param.low, param.high, log=param.kind == "log")


def apply(values, sampled):
  """`values` (train flag name -> value) with the sampled parameters put in."""
  out = dict(values)
  for name, value in sampled.items():
    if name == "projector_out":
      widths = str(out["projector"]).split("-")
      out["projector"] = "-".join(widths[:-1] + [str(int(value))])
    else:
      out[name] = value
  return out
