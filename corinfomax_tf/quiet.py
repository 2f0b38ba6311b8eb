"""Third-party chatter kept off the console: TensorFlow's C++ start-up lines (no CUDA
driver, CPU features), the ONNX converter's TF1-API deprecation warnings and the
LiteRT interpreter's delegate line. A line that is not known chatter is passed on,
and nothing is hidden where the user asked to see it: TF_CPP_MIN_LOG_LEVEL set before
this package was imported, or a command's --verbosity (`show_everything()`).
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings

_STATE = {"show": "TF_CPP_MIN_LOG_LEVEL" in os.environ}

# Lines TensorFlow and XLA write to stderr at start-up whatever TF_CPP_MIN_LOG_LEVEL says
# (they are logged before absl's logging is initialised).
START_UP = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cpu_feature_guard\.cc|"
    r"To enable the following instructions|cuda_platform\.cc.*cuInit|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|TF-TRT Warning|"
    r"oneDNN custom operations are on")
LITERT = re.compile(r"Created TensorFlow Lite XNNPACK delegate")


def show_everything():
  """Hide nothing from now on (a command's --verbosity)."""
  _STATE["show"] = True


def hiding():
  return not _STATE["show"]


@contextlib.contextmanager
def filtered_stderr(noise):
  """Runs the block with file descriptor 2 captured; afterwards, writes to stderr the
  captured lines that `noise` (a compiled pattern) does not match."""
  if not hiding():
    yield
    return
  sys.stderr.flush()
  with tempfile.TemporaryFile() as captured:
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines()
              if not noise.search(line)]
      if kept:
        print("\n".join(kept), file=sys.stderr, flush=True)


@contextlib.contextmanager
def converter_warnings():
  """Runs a converter with its deprecation warnings (Python's, and TensorFlow's logger
  below ERROR) off the console."""
  if not hiding():
    yield
    return
  logger = logging.getLogger("tensorflow")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", FutureWarning)
      warnings.simplefilter("ignore", DeprecationWarning)
      yield
  finally:
    logger.setLevel(level)


def start_tensorflow():
  """Imports TensorFlow and finds its devices with the start-up lines filtered.
  Logical devices can still be configured afterwards."""
  if "tensorflow" in sys.modules:
    return
  with filtered_stderr(START_UP):
    import tensorflow as tf
    tf.config.list_physical_devices("GPU")   # CUDA's start-up lines come here
