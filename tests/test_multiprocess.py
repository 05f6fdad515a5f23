"""Two real JAX processes on this machine (2 CPU devices each, collectives through gloo): the pipeline trains and
distils as one process of 4 devices does, each process samples alone, a rerun resumes from their files, and a
killed process stops the other in bounded time. Where JAX cannot start a CPU job of several processes, skipped."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from sferd_jax import exports

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multiprocess_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(workdir, phases, logs, num_processes=2):
  """The processes of one job, each logging to a file in `logs` (pipes read one at a time would fill and block a
  process inside a collective)."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  os.makedirs(logs, exist_ok=True)
  processes = []
  for i in range(num_processes):
    with open(os.path.join(logs, f'process_{i}.log'), 'w') as log:
      processes.append(subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port), workdir,
                                         phases], stdout=log, stderr=subprocess.STDOUT, text=True, env=env))
  return processes


def _finish(processes, logs, timeout=900):
  """(exit codes, outputs) once every process has ended."""
  codes = [p.wait(timeout=timeout) for p in processes]
  outputs = []
  for i in range(len(processes)):
    with open(os.path.join(logs, f'process_{i}.log')) as f:
      outputs.append(f.read())
  return codes, outputs


def test_two_processes_train_and_distil_as_one_process_of_four_devices(tmp_path, tiny_run):
  reference, _ = tiny_run  # the same config in one process of 4 devices
  workdir = str(tmp_path / 'run')
  logs = str(tmp_path / 'logs')
  codes, outputs = _finish(_start(workdir, 'teacher,distill', logs), logs)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  for i, out in enumerate(outputs):
    assert f'process {i} of 2: 2 of 4 devices' in out and 'sampled (4, 8, 8, 1)' in out, out[-3000:]
  for model in ('teacher', 'distill/stage_1', 'distill/stage_2'):
    # Gradients summed across processes by gloo rather than within one process: equal to float32 rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                 exports.load(os.path.join(reference, model)).params, exports.load(os.path.join(workdir, model)).params)
  # A rerun of the two processes finds their exports and skips every phase.
  codes, outputs = _finish(_start(workdir, 'teacher,distill', logs), logs)
  assert codes == [0, 0] and outputs[0].count('finished and exported') == 3, outputs[0][-3000:]


def test_a_killed_process_stops_the_other_in_bounded_time(tmp_path):
  logs = str(tmp_path / 'logs')
  processes = _start(str(tmp_path / 'run'), 'teacher', logs)
  started = time.time()
  while 'process 0 of 2' not in open(os.path.join(logs, 'process_0.log')).read():  # both have joined the job
    assert time.time() - started < 300 and processes[0].poll() is None, 'the job did not start'
    time.sleep(0.5)
  os.kill(processes[1].pid, signal.SIGKILL)
  start = time.time()
  assert processes[0].wait(timeout=120) != 0 and time.time() - start < 120
  processes[1].wait()
