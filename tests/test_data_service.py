"""Training fed by a tf.data service: the index stream, an in-process service with two
workers, and the training command against a dispatcher and two workers started as
processes (`python -m corinfomax_tf.data_service`), all on loopback."""

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from corinfomax_tf.data import augment
from corinfomax_tf.data import datasets as data
from tests import helpers

VIEWS = (augment.ViewConfig(blur_prob=1.0), augment.ViewConfig(blur_prob=0.1,
                                                                solarize_prob=0.2))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = helpers.write_image_tree(str(tmp_path_factory.mktemp("svc") / "photos"), count=10)
  return data.load_source("images", image_size=12, data_dir=root)


def elements(src, seed, first, count):
  ds = data.indexed_elements(src, seed, first=first, chunk=4).take(count)
  return [(p.numpy().decode(), int(s)) for p, _, s in ds]


def test_every_epoch_holds_every_image_once_in_its_own_order(source):
  n = source.num_train
  stream = elements(source, 0, 0, 3 * n)
  epochs = [sorted(p for p, _ in stream[e * n:(e + 1) * n]) for e in range(3)]
  assert epochs[0] == epochs[1] == epochs[2] == sorted(source.scans[0].paths)
  orders = [[p for p, _ in stream[e * n:(e + 1) * n]] for e in range(3)]
  assert orders[0] != orders[1] != orders[2]
  assert len({s for _, s in stream}) == len(stream)           # a seed per element
  assert elements(source, 1, 0, n) != stream[:n]                # the seed decides


def test_an_element_is_the_same_from_any_start(source):
  """What resuming at element k gives is the uninterrupted stream from k on (also
  inside a chunk)."""
  stream = elements(source, 3, 0, 25)
  for first in (1, 4, 7, 13):
    assert elements(source, 3, first, 25 - first) == stream[first:]


@pytest.mark.slow
def test_two_in_process_workers_make_exactly_the_local_views(source):
  """Every view the service delivers is, bitwise, the view the same index stream gives
  locally, whichever worker made it, and none comes twice. Which elements come first
  depends on the workers (each takes chunks of indices), so the delivered ones are
  looked up among the local elements of the chunks that can be in flight."""
  service = tf.data.experimental.service
  dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
  address = dispatcher.target.split("://")[1]
  workers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
             for _ in range(2)]
  count, batch = 2 * source.num_train, 4
  remote = data.service_two_view_dataset(
      source, service=dispatcher.target, job_name="test_job", global_batch_size=batch,
      image_size=12, views=VIEWS, mean=MEAN, std=STD, seed=5, skip_batches=1)
  local = data.decode_skipping_errors(data.indexed_elements(source, 5, first=batch)).map(
      data.views_of(12, VIEWS, MEAN, STD))
  got = [digest(v) for views, _ in remote.take(count // batch) for v in views.numpy()]
  want = {digest(v.numpy()) for v, _ in local.take(count + 2 * data.SERVICE_CHUNK)}
  assert len(got) == count and len(set(got)) == count
  assert set(got) <= want
  del workers, dispatcher


def digest(array):
  return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _server(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return helpers.popen([sys.executable, "-m", "corinfomax_tf.data_service", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=helpers.ROOT)


@pytest.mark.slow
@pytest.mark.alone
def test_training_feeds_from_a_dispatcher_and_two_worker_processes(tmp_path):
  root = helpers.write_image_tree(str(tmp_path / "photos"), count=24)
  port = helpers.free_port()
  servers = [_server("--role=dispatcher", f"--port={port}")]
  servers += [_server("--role=worker", f"--dispatcher=localhost:{port}") for _ in range(2)]
  try:
    time.sleep(3)
    assert all(s.poll() is None for s in servers)
    result = helpers.run_command(
        "corinfomax_tf.train", f"--flagfile={helpers.ROOT}/configs/smoke.cfg",
        f"--workdir={tmp_path}/run", "--dataset=images", f"--data_dir={root}",
        "--image_size=12", "--epochs=2", "--steps_per_epoch=0", "--probe_epochs=0",
        "--preview_images=0", f"--data_service=grpc://localhost:{port}", timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "tf.data service" in result.stdout
    assert os.path.exists(tmp_path / "run" / "summary.json")
  finally:
    for s in servers:
      s.terminate()
    logs = [s.communicate(timeout=30)[0] for s in servers]
  assert "dispatcher" in logs[0] and "worker" in logs[1] and "worker" in logs[2]


def test_a_dispatcher_that_does_not_answer_is_one_line_before_any_work():
  from corinfomax_tf import errors
  address = f"grpc://localhost:{helpers.free_port()}"
  with pytest.raises(errors.DataError, match=f"--data_service={address}: no tf.data service"):
    data.check_data_service(address, timeout=1.0)


@pytest.mark.slow
def test_the_workers_of_a_run_agree_on_the_first_replicas_number():
  from corinfomax_tf.training import distribute
  from tests.conftest import CPU_DEVICES, mirrored
  for strategy in (tf.distribute.get_strategy(), mirrored(CPU_DEVICES[:2])):
    assert distribute.value_of_first_replica(strategy, 2**61 + 7) == 2**61 + 7
