"""Commands in real processes without paying TensorFlow's import each time.

Every command a test runs (`python -m corinfomax_tf.<command>`, `python export/...py`)
starts a process that spends about 9 s importing TensorFlow, Keras and keras-hub
before its first line of our code (a 2-core AMD EPYC). A fork server imports them
once; each command is then a fork of it: a process of its own, with its own pid,
stdout/stderr pipes, environment, working directory, exit status and signals (a test
can SIGKILL or SIGTERM it), running the command's module as `__main__` from the start
of its own code. What a fork skips is only the interpreter's start and those imports,
so a command that depends on how it starts (`--help` without TensorFlow, the start-up
lines filtered) is tested with `subprocess` itself (test_cli_start.py).

`popen(args, ...)` / `run(args, ...)` take what `subprocess.Popen` / `subprocess.run`
take in this suite and use the server when `args` is `[sys.executable, "-m", module,
...]` or `[sys.executable, script.py, ...]` or `[sys.executable, "-c", code, ...]` and the environment agrees with the
server's on every variable read while importing (TF_*, KERAS_*, XLA_*, CUDA*, ...);
otherwise they are `subprocess` itself.

Set CORINFOMAX_TESTS_NO_FORKSERVER=1 to run every command as a fresh process.
"""

import array
import atexit
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Read while importing (or fixed for the process): a command whose environment
# differs here runs as a fresh process. TF_CONFIG is read when a strategy is made.
_IMPORT_TIME_PREFIXES = ("TF_", "KERAS_", "XLA_", "CUDA", "OMP_", "MKL", "KMP_", "JAX_",
                         "PYTHON", "LD_", "TFDS_", "TENSORBOARD")
_RUNTIME_KEYS = {"TF_CONFIG"}

# Imported by the server. Not onnxruntime (or what imports it: our export modules):
# it starts a thread at import that its exit handlers join, and a fork has none.
_PRELOAD = ["tensorflow", "keras", "keras_hub", "tensorflow_datasets", "numpy",
            "PIL.Image", "sklearn.linear_model"]


def _import_env(env):
  return {k: v for k, v in env.items()
          if k.startswith(_IMPORT_TIME_PREFIXES) and k not in _RUNTIME_KEYS}


# ----------------------------------------------------------------------------
# The server (a process of its own: `python tests/forkserver.py <socket> <env json>`).
# ----------------------------------------------------------------------------


def _child(request, fds):
  """In the forked child: become the command and exit as Python would (always
  through os._exit: the server's C exit handlers must not run in a fork)."""
  code = 0
  try:
    for target, fd in enumerate(fds):
      os.dup2(fd, target)
      os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None   # found again from this environment's TMPDIR
    argv = request["argv"]
    import runpy
    if argv[0] == "-c":
      sys.argv = ["-c", *argv[2:]]
      sys.path[0] = ""
      import types
      main = types.ModuleType("__main__")
      sys.modules["__main__"] = main
      exec(compile(argv[1], "<string>", "exec"), main.__dict__)   # noqa: S102 (as -c)
    elif argv[0] == "-m":
      sys.argv = [argv[1], *argv[2:]]
      sys.path[0] = request["cwd"]
      runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
      sys.argv = list(argv)
      sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
      runpy.run_path(argv[0], run_name="__main__")
  except SystemExit as exit_:
    if exit_.code is None:
      code = 0
    elif isinstance(exit_.code, int):
      code = exit_.code
    else:
      print(exit_.code, file=sys.stderr)
      code = 1
  except BaseException:   # noqa: B036 (what the interpreter does with it)
    import traceback
    traceback.print_exc()
    code = 1
  try:
    threading._shutdown()   # as at interpreter exit: join non-daemon threads
    atexit._run_exitfuncs()
  finally:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:   # noqa: BLE001 (a closed pipe at exit, as Python ignores)
        pass
    os._exit(code & 0xFF)


def _serve_one(conn, request, fds):
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    conn.close()
    _child(request, fds)
  for fd in fds:
    os.close(fd)
  conn.sendall(struct.pack("!i", pid))

  def reap():
    _, status = os.waitpid(pid, 0)
    try:
      conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
    except OSError:
      pass
    conn.close()
  threading.Thread(target=reap, daemon=True).start()


def _recv_request(conn):
  fds = array.array("i")
  data = b""
  while not data.endswith(b"\n"):
    msg, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_LEN(3 * fds.itemsize))
    if not msg:
      raise EOFError
    data += msg
    for level, kind, payload in ancdata:
      if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
  return json.loads(data), list(fds)


def serve(path):
  for name in _PRELOAD:
    __import__(name)
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(64)
  print("ready", flush=True)
  while True:
    conn, _ = listener.accept()
    try:
      request, fds = _recv_request(conn)
    except (EOFError, ValueError, OSError):
      conn.close()
      continue
    _serve_one(conn, request, fds)


# ----------------------------------------------------------------------------
# The client: what the tests call.
# ----------------------------------------------------------------------------


class _Server:

  def __init__(self, env):
    self.dir = tempfile.mkdtemp(prefix="corinfomax-forkserver-")
    self.path = os.path.join(self.dir, "socket")
    self.env = dict(env)
    self.proc = subprocess.Popen([sys.executable, __file__, self.path], env=self.env,
                                 cwd=ROOT, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
    line = self.proc.stdout.readline()
    if line.strip() != "ready":
      raise RuntimeError(f"the test fork server did not start ({self.proc.poll()})")
    atexit.register(self.close)

  def close(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    try:
      os.remove(self.path)
      os.rmdir(self.dir)
    except OSError:
      pass


_server = None
_server_lock = threading.Lock()


def _server_for(env):
  global _server
  with _server_lock:
    if _server is None or _server.proc.poll() is not None:
      _server = _Server(env)
    return _server if _import_env(_server.env) == _import_env(env) else None


class ForkedProcess:
  """The part of `subprocess.Popen` the suite uses, for a command forked by the
  server: pid, stdout/stderr (text pipes, or None when not piped), poll, wait,
  communicate, send_signal, terminate, kill, returncode."""

  def __init__(self, server, argv, env, cwd, stdout, stderr):
    ends, theirs = {}, []
    null = os.open(os.devnull, os.O_RDWR)
    theirs.append(null)
    for name, want in (("stdout", stdout), ("stderr", stderr)):
      if want == subprocess.PIPE:
        r, w = os.pipe()
        ends[name] = r
        theirs.append(w)
      elif want == subprocess.STDOUT and name == "stderr":
        theirs.append(os.dup(theirs[1]))
      elif want == subprocess.DEVNULL:
        theirs.append(os.dup(null))
      elif want is None:
        theirs.append(os.dup(1 if name == "stdout" else 2))
      else:
        theirs.append(os.dup(want if isinstance(want, int) else want.fileno()))
    self.args = [sys.executable, *argv]
    self.returncode = None
    self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._conn.connect(server.path)
    request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n"
    self._conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", theirs))])
    for fd in theirs:
      os.close(fd)
    self.pid = struct.unpack("!i", self._recv(4))[0]
    self.stdout = os.fdopen(ends["stdout"], "r") if "stdout" in ends else None
    self.stderr = os.fdopen(ends["stderr"], "r") if "stderr" in ends else None

  def _recv(self, n):
    data = b""
    while len(data) < n:
      chunk = self._conn.recv(n - len(data))
      if not chunk:
        raise RuntimeError("the test fork server went away")
      data += chunk
    return data

  def poll(self):
    if self.returncode is None:
      self._conn.setblocking(False)
      try:
        self.returncode = struct.unpack("!i", self._recv(4))[0]
      except BlockingIOError:
        pass
      finally:
        self._conn.setblocking(True)
    return self.returncode

  def wait(self, timeout=None):
    if self.returncode is None:
      self._conn.settimeout(timeout)
      try:
        self.returncode = struct.unpack("!i", self._recv(4))[0]
      except socket.timeout:
        raise subprocess.TimeoutExpired(self.args, timeout) from None
      finally:
        self._conn.settimeout(None)
      self._conn.close()
    return self.returncode

  def communicate(self, input=None, timeout=None):   # noqa: A002 (Popen's name)
    del input
    out = {}

    def drain(name, stream):
      out[name] = stream.read()
      stream.close()
    threads = [threading.Thread(target=drain, args=(name, stream), daemon=True)
               for name, stream in (("stdout", self.stdout), ("stderr", self.stderr))
               if stream is not None and not stream.closed]
    for thread in threads:
      thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in threads:
      thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
      if thread.is_alive():
        raise subprocess.TimeoutExpired(self.args, timeout)
    self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return out.get("stdout"), out.get("stderr")

  def send_signal(self, sig):
    if self.returncode is None:
      try:
        os.kill(self.pid, sig)
      except ProcessLookupError:
        pass

  def terminate(self):
    self.send_signal(signal.SIGTERM)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for stream in (self.stdout, self.stderr):
      if stream is not None:
        stream.close()
    self.wait()


def _forkable(args, kwargs):
  if os.environ.get("CORINFOMAX_TESTS_NO_FORKSERVER"):
    return None
  args = list(args)
  if len(args) < 2 or args[0] != sys.executable or not kwargs.get("text", False):
    return None
  if set(kwargs) - {"stdout", "stderr", "text", "env", "cwd"}:
    return None
  if args[1] in ("-m", "-c"):
    if len(args) < 3:
      return None
  elif args[1].startswith("-") or not args[1].endswith(".py"):
    return None
  return args[1:]


def popen(args, **kwargs):
  """`subprocess.Popen(args, **kwargs)`, forked from the server where it can be."""
  argv = _forkable(args, kwargs)
  env = kwargs.get("env") or dict(os.environ)
  server = _server_for(env) if argv is not None else None
  if server is None:
    return subprocess.Popen(args, **kwargs)
  try:
    cwd = os.path.abspath(kwargs.get("cwd") or os.getcwd())
  except FileNotFoundError:   # the test's working folder is gone: subprocess copes
    return subprocess.Popen(args, **kwargs)
  return ForkedProcess(server, argv, dict(env), cwd, kwargs.get("stdout"),
                       kwargs.get("stderr"))


def run(args, *, capture_output=False, timeout=None, **kwargs):
  """`subprocess.run(args, ...)` (capture_output, timeout, text, env, cwd)."""
  if capture_output:
    kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  proc = popen(args, **kwargs)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


if __name__ == "__main__":
  serve(sys.argv[1])
