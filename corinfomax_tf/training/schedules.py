"""Learning-rate schedule and the optimiser of the reference.

The reference uses PyTorch's SGD: coupled L2 weight decay added to the gradient of
every parameter (BatchNorm and biases included), then heavy-ball momentum on that
sum, and the learning rate applied at update time:

    d = g + wd * w;  buf = momentum * buf + d;  w = w - lr * buf

Keras' SGD keeps `velocity = momentum * velocity - lr * g` (the learning rate folded
into the buffer) and its `weight_decay` is decoupled, so under a changing learning
rate (warm-up, cosine) it does not give the same trajectory. `ReferenceSGD` does.
"""

import math

import keras
from keras import ops


def step_schedule(base_lr, decay_epochs, factor, steps_per_epoch):
  """base_lr, times `factor` at each of `decay_epochs` (constant if there are none)."""
  boundaries = [int(e) * steps_per_epoch for e in decay_epochs]
  if not boundaries:  # PiecewiseConstantDecay cannot take an empty list
    return keras.optimizers.schedules.ExponentialDecay(base_lr, decay_steps=1,
                                                       decay_rate=1.0)
  return keras.optimizers.schedules.PiecewiseConstantDecay(
      boundaries, [base_lr * factor**i for i in range(len(boundaries) + 1)])


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from `warmup_start_lr` to `base_lr`, then cosine to `min_lr`.

  Per step: for step < warmup_steps the rate is
  warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps; afterwards
  min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t)), t the fraction of the
  post-warm-up steps done.

  With `steps_per_update=n` the rate changes only every n optimizer steps, and
  `total_steps`/`warmup_steps` count those updates: a scheduler stepped once per
  epoch (n = steps per epoch), as the reference's linear evaluation steps
  PyTorch's CosineAnnealingLR, gives the rate of epoch e to every step of epoch e.
  """

  def __init__(self, base_lr, total_steps, warmup_steps=0, warmup_start_lr=3e-3,
               min_lr=1e-6, steps_per_update=1):
    if total_steps < 1:
      raise ValueError(f"total_steps must be >= 1. Received: total_steps={total_steps!r}")
    if not 0 <= warmup_steps <= total_steps:
      raise ValueError("warmup_steps must be in [0, total_steps]. Received: "
                       f"warmup_steps={warmup_steps!r}, total_steps={total_steps!r}")
    self.base_lr = float(base_lr)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.warmup_start_lr = float(warmup_start_lr)
    self.min_lr = float(min_lr)
    if steps_per_update < 1:
      raise ValueError("steps_per_update must be >= 1. Received: "
                       f"steps_per_update={steps_per_update!r}")
    self.steps_per_update = int(steps_per_update)

  def __call__(self, step):
    step = ops.cast(step, "float32")
    if self.steps_per_update > 1:
      step = ops.floor(step / float(self.steps_per_update))
    warm = float(max(self.warmup_steps, 1))
    warmup_lr = self.warmup_start_lr + (self.base_lr - self.warmup_start_lr) * step / warm
    decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
    t = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
    cosine_lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (
        1.0 + ops.cos(math.pi * t))
    return ops.where(step < self.warmup_steps, warmup_lr, cosine_lr)

  def get_config(self):
    return {"base_lr": self.base_lr, "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps, "warmup_start_lr": self.warmup_start_lr,
            "min_lr": self.min_lr, "steps_per_update": self.steps_per_update}


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class ExtendedSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """A schedule, then phases that train longer (`--extend_epochs`).

  `phases`: [(steps, start_lr)], in order; phase k covers the `steps` steps after
  the previous phase (the first: after `base_steps`, where `base` ends), its rate a
  half cosine from `start_lr` down to `min_lr`: min_lr + 0.5 * (start_lr - min_lr) *
  (1 + cos(pi * t)), t the fraction of the phase done. `start_lr` None: `min_lr`,
  where the paper's cosine and every phase end, so the phase is constant. Before
  `base_steps` the rate is `base`'s.
  """

  def __init__(self, base, base_steps, phases, min_lr):
    if isinstance(base, dict):
      base = keras.saving.deserialize_keras_object(base)
    self.base = base
    self.base_steps = int(base_steps)
    self.min_lr = float(min_lr)
    self.phases = [(int(steps), None if lr is None else float(lr)) for steps, lr in phases]
    self.segments = []   # (first step, steps, start rate)
    start = self.base_steps
    for steps, lr in self.phases:
      if steps < 1:
        raise ValueError(f"Each phase needs >= 1 step. Received: phases={phases!r}")
      first = self.min_lr if lr is None else lr
      self.segments.append((start, steps, first))
      start += steps
    self.total_steps = start

  def __call__(self, step):
    step_f = ops.cast(step, "float32")
    rate = self.base(step)
    for first, steps, lr in self.segments:
      t = ops.clip((step_f - first) / float(steps), 0.0, 1.0)
      cosine = self.min_lr + 0.5 * (lr - self.min_lr) * (1.0 + ops.cos(math.pi * t))
      rate = ops.where(step_f >= first, ops.cast(cosine, rate.dtype), rate)
    return rate

  def describe(self, steps_per_epoch):
    """One line per phase: its epochs, steps and rates."""
    lines = []
    for k, (first, steps, lr) in enumerate(self.segments):
      epochs = (first // steps_per_epoch + 1, (first + steps) // steps_per_epoch)
      epochs = (f"epoch {epochs[0]}" if epochs[0] == epochs[1] else
                f"epochs {epochs[0]}-{epochs[1]}")
      shape = (f"constant {lr:.3g} (--min_lr, where the schedule ends; "
               "--extend_epochs=N@LR starts a new cosine from LR)"
               if lr == self.min_lr else f"a cosine from {lr:.3g} to {self.min_lr:.3g}")
      lines.append(f"Extension {k + 1}: {epochs} (steps "
                   f"{first + 1}-{first + steps}), learning rate {shape}")
    return lines

  def get_config(self):
    return {"base": keras.saving.serialize_keras_object(self.base),
            "base_steps": self.base_steps, "phases": [list(p) for p in self.phases],
            "min_lr": self.min_lr}


@keras.saving.register_keras_serializable(package="corinfomax_tf")
class ReferenceSGD(keras.optimizers.Optimizer):
  """PyTorch-semantics SGD: coupled L2 weight decay, momentum buffer without lr."""

  def __init__(self, learning_rate=0.01, momentum=0.9, l2_weight_decay=1e-4,
               name="reference_sgd", **kwargs):
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1). Received: momentum={momentum!r}")
    if l2_weight_decay < 0:
      raise ValueError("l2_weight_decay must be >= 0. "
                       f"Received: l2_weight_decay={l2_weight_decay!r}")
    self.momentum = float(momentum)
    self.l2_weight_decay = float(l2_weight_decay)

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self.momentums = self.add_optimizer_variables(variables, "momentum")

  def update_step(self, gradient, variable, learning_rate):
    lr = ops.cast(learning_rate, variable.dtype)
    g = ops.cast(gradient, variable.dtype)
    if self.l2_weight_decay:
      g = g + ops.cast(self.l2_weight_decay, variable.dtype) * variable
    buf = self.momentums[self._get_variable_index(variable)]
    # PyTorch initialises the buffer with the first gradient; with a zero buffer
    # momentum * 0 + d is the same thing.
    self.assign(buf, ops.cast(self.momentum, variable.dtype) * buf + g)
    self.assign_sub(variable, lr * buf)

  def get_config(self):
    config = super().get_config()
    config.update(momentum=self.momentum, l2_weight_decay=self.l2_weight_decay)
    return config


def reference_optimizer(base_lr, total_steps, warmup_steps, *, momentum=0.9,
                        weight_decay=1e-4, warmup_start_lr=3e-3, min_lr=1e-6,
                        extensions=()):
  """The paper's optimisation: (ReferenceSGD on a WarmupCosine schedule, the schedule).
  `extensions`: [(steps, start rate or None)] trained after `total_steps`
  (`ExtendedSchedule`)."""
  schedule = WarmupCosine(base_lr=base_lr, total_steps=total_steps,
                          warmup_steps=min(warmup_steps, total_steps),
                          warmup_start_lr=warmup_start_lr, min_lr=min_lr)
  if extensions:
    schedule = ExtendedSchedule(schedule, total_steps, extensions, min_lr)
  return ReferenceSGD(schedule, momentum=momentum, l2_weight_decay=weight_decay), schedule
