"""Errors a user can fix: the command runner prints their message as one line.

Every problem that the person running a command can fix (a flag value, a path, the
data, the workdir, a run that stopped for a reason they can act on) is a `UserError`.
`cli.runner` turns it into `error: <message>` on stderr and the exit status of its
class; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Base class of every error a user can fix: one line for the user, exit status
  `exit_code` (2; subclasses: ConfigError, DataError, WorkdirError, ExportError,
  TrainingStopped; WorkerLost 75; Preempted 143). The commands print it as
  `error: <message>`; from Python, catch it.

  Example:

  ```python
  try:
    corinfomax_tf.pretrain(backbone, images, workdir="runs/a", image_size=32,
                           epochs=100, batch_size=256, lr=-1)
  except corinfomax_tf.UserError as e:
    print(e)   # --lr=-1: must be > 0
  ```
  """
  exit_code = 2
  prefix = "error"


class ConfigError(UserError, ValueError):
  """A flag value (or combination) that cannot be used; the message names the flag.
  Also a `ValueError`: Python callers may catch either."""


class DataError(UserError):
  """A data set, folder, file or annotation that cannot be used; the message names it."""


class WorkdirError(UserError):
  """The workdir cannot be used: not writable, full, locked, or no intact checkpoint."""


class ExportError(UserError):
  """An export or encoder path that cannot be used; the message names it."""


class TrainingStopped(UserError):
  """Training stopped before any save (non-finite loss or gradient, a loss spike, a
  failed checkpoint write); the last good checkpoint is kept."""


class WorkerLost(UserError):
  """Another worker of a multi-worker run stopped; the last checkpoint is kept.

  A temporary failure (EX_TEMPFAIL): a scheduler restarting every worker with the
  same command resumes the run from its last checkpoint.
  """
  exit_code = 75


class Preempted(UserError):
  """SIGTERM/SIGINT: a checkpoint was saved at the current step and the job stopped."""
  exit_code = 143
  prefix = "preempted"
