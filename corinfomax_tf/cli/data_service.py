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
  # The flags' checks first: a bad value costs no TensorFlow start-up.
  if f.port < 0 or f.port > 65535:
    raise errors.ConfigError(f"--port={f.port}: must be in [0, 65535]")
  if f.role == "dispatcher" and (f.dispatcher or f.worker_address):
    raise errors.ConfigError("--dispatcher/--worker_address: only with --role=worker")
  if f.role != "dispatcher" and not f.dispatcher.split("://")[-1]:
    raise errors.ConfigError("--dispatcher is required with --role=worker (host:port)")
  runner.start_tensorflow()
  import tensorflow as tf

  from corinfomax_tf.data import datasets
  service = tf.data.experimental.service
  if f.role == "dispatcher":
    _check_port_free(f.port, datasets)
    config = service.DispatcherConfig(port=f.port, work_dir=f.work_dir or None,
                                      fault_tolerant_mode=bool(f.work_dir))
    server = _start(service.DispatchServer, config, f.port)
    runner.log(f"tf.data service dispatcher at {server.target} (train with "
               f"--data_service=grpc://{socket.gethostname()}:{server.target.rsplit(':', 1)[1]})")
  else:
    address = f.dispatcher.split("://")[-1]
    host, _, port = address.rpartition(":")
    _check_port_free(f.port, datasets)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    next_report = start
    while not datasets.tcp_reachable(host, port, timeout=1.0):
      waited = time.monotonic() - start
      if waited > f.wait_for_dispatcher:
        raise errors.ConfigError(f"--dispatcher={f.dispatcher}: nothing answered there for "
                                 f"{f.wait_for_dispatcher} s; start the dispatcher first")
      if time.monotonic() >= next_report:
        runner.log(f"Waiting for the dispatcher at {address} ({waited:.0f} of "
                   f"{f.wait_for_dispatcher} s, --wait_for_dispatcher)")
        next_report = time.monotonic() + 15.0
      time.sleep(1.0)
    port = f.port or _free_port()
    config = service.WorkerConfig(
        dispatcher_address=address, port=port,
        worker_address=f.worker_address or f"{socket.gethostname()}:{port}")
    server = _start(service.WorkerServer, config, port)
    runner.log(f"tf.data service worker at port {port}, dispatcher {address}")
  # Serves from TensorFlow's threads; this thread only waits for a signal (a
  # blocking join() would not let Python's SIGTERM handler run).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  try:
    if f.role == "worker":
      _watch_dispatcher(host, port, address)
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  del server


def _watch_dispatcher(host, port, address, every=5.0):
  """A worker's one line when its dispatcher stops answering, and one when it is back
  (TensorFlow's own heartbeat warnings say neither what to do nor when it is over)."""
  from corinfomax_tf.data import datasets
  gone_since = None
  while True:
    time.sleep(every)
    up = datasets.tcp_reachable(host, port, timeout=2.0)
    if not up and gone_since is None:
      gone_since = time.strftime("%H:%M:%S")
      runner.log(f"The dispatcher at {address} does not answer (since {gone_since}); this "
                 "worker waits for it to come back (a dispatcher restarted with the same "
                 "--work_dir resumes its jobs). Stop the worker with Ctrl-C or SIGTERM.")
    elif up and gone_since is not None:
      runner.log(f"The dispatcher at {address} answers again (was gone since {gone_since})")
      gone_since = None


def _check_port_free(port, datasets):
  """One line when --port is taken. gRPC servers share a port (SO_REUSEPORT), so a
  second dispatcher on a busy port would start as if alone: refuse a port where
  something answers, or that this process cannot bind."""
  if not port:
    return
  taken = datasets.tcp_reachable("localhost", port, timeout=1.0)
  if not taken:
    with socket.socket() as s:
      try:
        s.bind(("", port))
      except OSError:
        taken = True
  if taken:
    raise errors.ConfigError(f"--port={port}: in use (another dispatcher or worker, or "
                             "another program, listens there); stop it, or choose another "
                             "--port (0: any free port)")


def _start(server_class, config, port):
  import tensorflow as tf
  try:
    return server_class(config)
  except (tf.errors.OpError, RuntimeError) as e:
    message = getattr(e, "message", str(e)).splitlines()[0][:200]
    raise errors.ConfigError(f"--port={port}: the tf.data service server did not start "
                             f"({message})") from None


def _free_port():
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def run():
  runner.run(main, define_flags, required=[("role", "dispatcher or worker")])
