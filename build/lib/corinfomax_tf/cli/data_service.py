r"""A tf.data service dispatcher or worker, for training whose input needs more CPUs
than the training hosts have.

    python -m corinfomax_tf.data_service --role=dispatcher --port=5050 \
        [--work_dir=/shared/dispatcher]                 # one, on any host
    python -m corinfomax_tf.data_service --role=worker \
        --dispatcher=dispatcher-host:5050 [--port=5051]  # one per CPU host
    python -m corinfomax_tf.train ... --data_service=grpc://dispatcher-host:5050

Workers read the training images at the paths the trainer names (a shared file
system); each runs until stopped (Ctrl-C, SIGTERM). TensorFlow's own servers
(tf.data.experimental.service); nothing of this package runs inside them.
"""

import signal
import socket
import sys
import time

from absl import flags

from corinfomax_tf import errors
from corinfomax_tf.cli import runner


def define_flags():
  flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "Which server to run.")
  flags.DEFINE_integer("port", 0, "Port to serve on (0: any free port, printed).")
  flags.DEFINE_string("dispatcher", "", "--role=worker: the dispatcher's host:port.")
  flags.DEFINE_string("worker_address", "",
                      "--role=worker: host:port the dispatcher and trainers reach this "
                      "worker at (default: this host's name and --port).")
  flags.DEFINE_integer("wait_for_dispatcher", 120,
                       "--role=worker: seconds to wait for the dispatcher to answer (hosts "
                       "of a cluster start in any order).")
  flags.DEFINE_string("work_dir", "",
                      "--role=dispatcher: a directory for its journal, so that a restarted "
                      "dispatcher resumes its jobs (fault tolerance).")


def main(f):
  import tensorflow as tf

  from corinfomax_tf.data import datasets
  service = tf.data.experimental.service
  if f.port < 0 or f.port > 65535:
    raise errors.ConfigError(f"--port={f.port}: must be in [0, 65535]")
  if f.role == "dispatcher":
    if f.dispatcher or f.worker_address:
      raise errors.ConfigError("--dispatcher/--worker_address: only with --role=worker")
    config = service.DispatcherConfig(port=f.port, work_dir=f.work_dir or None,
                                      fault_tolerant_mode=bool(f.work_dir))
    server = service.DispatchServer(config)
    runner.log(f"tf.data service dispatcher at {server.target} (train with "
               f"--data_service=grpc://{socket.gethostname()}:{server.target.rsplit(':', 1)[1]})")
  else:
    address = f.dispatcher.split("://")[-1]
    if not address:
      raise errors.ConfigError("--dispatcher is required with --role=worker (host:port)")
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + f.wait_for_dispatcher
    while not datasets.tcp_reachable(host, port):
      if time.monotonic() > deadline:
        raise errors.ConfigError(f"--dispatcher={f.dispatcher}: nothing answered there for "
                                 f"{f.wait_for_dispatcher} s; start the dispatcher first")
      time.sleep(1.0)
    port = f.port or _free_port()
    config = service.WorkerConfig(
        dispatcher_address=address, port=port,
        worker_address=f.worker_address or f"{socket.gethostname()}:{port}")
    server = service.WorkerServer(config)
    runner.log(f"tf.data service worker at port {port}, dispatcher {address}")
  # Serves from TensorFlow's threads; this thread only waits for a signal (a
  # blocking join() would not let Python's SIGTERM handler run).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  del server


def _free_port():
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def run():
  runner.run(main, define_flags, required=[("role", "dispatcher or worker")])
