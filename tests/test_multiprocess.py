"""Two real JAX processes on this machine (2 CPU devices each, collectives through gloo): the pipeline trains and
distils as one process of 4 devices does, each process samples alone, a rerun resumes from their files, and a
killed process stops the other in bounded time. Where JAX cannot start a CPU job of several processes, skipped."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from sferd_jax import exports
from sferd_jax import layout
from sferd_jax import pipeline
from sferd_jax.evaluation import evaluate
import test_reliability
import tiny

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multiprocess_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(workdir, phases, logs, num_processes=2, **options):
  """The processes of one job, each logging to a file in `logs` (pipes read one at a time would fill and block a
  process inside a collective); options: the worker's (kill_after, overrides)."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  os.makedirs(logs, exist_ok=True)
  processes = []
  for i in range(num_processes):
    with open(os.path.join(logs, f'process_{i}.log'), 'w') as log:
      processes.append(subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port), workdir,
                                         phases, json.dumps(options)], stdout=log,
                                        stderr=subprocess.STDOUT, text=True, env=env))
  return processes


def _finish(processes, logs, timeout=900):
  """(exit codes, outputs) once every process has ended."""
  codes = [p.wait(timeout=timeout) for p in processes]
  outputs = []
  for i in range(len(processes)):
    with open(os.path.join(logs, f'process_{i}.log')) as f:
      outputs.append(f.read())
  return codes, outputs


def _io(workdir, process):
  """What process `process` read (per Batches, per step: example indices) and wrote (project files)."""
  with open(os.path.join(workdir + '.io', f'process_{process}.json')) as f:
    return json.load(f)


def test_two_processes_train_and_distil_as_one_process_of_four_devices(tmp_path, tiny_run):
  reference, _ = tiny_run  # the same config in one process of 4 devices
  workdir = str(tmp_path / 'run')
  logs = str(tmp_path / 'logs')
  # Preempted: the teacher killed in both processes after its checkpoint at step 2; the rerun resumes from there.
  codes, outputs = _finish(_start(workdir, 'teacher,distill', logs, kill_after=4), logs)
  assert codes[0] != 0 and codes[1] != 0 and 'killed' in outputs[0], outputs[0][-3000:]
  assert os.path.isdir(os.path.join(workdir, 'teacher', 'checkpoints', '2'))
  codes, outputs = _finish(_start(workdir, 'teacher,distill', logs), logs)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert 'teacher: resuming from the checkpoint at step 2' in outputs[0]
  # Each process read its own half of every global batch; only process 0 wrote the project's files (Orbax writes
  # its checkpoints from every process, through its own barriers).
  reads = [_io(workdir, i)['reads'] for i in range(2)]
  assert reads[0].keys() == reads[1].keys() and len(reads[0]) == 2  # the teacher's batches, distillation's
  for batches in reads[0]:
    for step in reads[0][batches]:
      mine, theirs = (np.asarray(r[batches][step]) for r in reads)
      assert mine.shape == theirs.shape == (1, 4)  # (steps per call, global batch 8 / 2 processes)
      assert len(set(mine.ravel())) == 4  # (the tiny data has 1797 images: no repeats within a batch)
      assert not set(mine.ravel()) & set(theirs.ravel())
  writes = [_io(workdir, i)['writes'] for i in range(2)]
  assert writes[1] == [] and os.path.join(workdir, 'distill', 'stage_2', 'model', 'model.json') in writes[0]
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


def test_a_locked_run_folder_stops_every_process_at_once(tmp_path):
  """Process 0 takes the run folder's lock for the job; when another run holds it, every process stops with that
  message (the others learn it from process 0) instead of waiting in a collective for JAX's heartbeat timeout. The
  processes join through JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, as on a cluster JAX cannot
  detect."""
  workdir = str(tmp_path / 'run')
  holder = test_reliability._holder(workdir)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu', PYTHONPATH=tiny.ROOT,
             JAX_COORDINATOR_ADDRESS=f'localhost:{_free_port()}', JAX_NUM_PROCESSES='2')
  try:
    processes = [subprocess.Popen([sys.executable, '-m', 'sferd_jax.main', '--config=configs/tiny.py',
                                   f'--workdir={workdir}', '--mode=train_teacher', '--jit_cache='],
                                  env=dict(env, JAX_PROCESS_ID=str(i)), cwd=tiny.ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120)[1] for p in processes]
  finally:
    holder.kill()
    holder.wait()
  assert [p.returncode for p in processes] == [2, 2], outputs[0][-3000:] + outputs[1][-3000:]
  assert f'in use by another run: pid {holder.pid}' in outputs[0]
  assert f'error: locking {workdir} failed on process 0: {workdir} is in use by another run' in outputs[1]
  assert not os.path.exists(os.path.join(workdir, 'teacher'))


# The rest of the pipeline, from the tiny teacher: one stage distilled with the attention-guided teacher, its
# semantic predictor and latent model, and the evaluation with and without the predictor.
GUIDED = {'sferd.attention_guidance.enabled': True, 'distill.end_num_steps': 2, 'evaluate.models': ['distill/stage_1'],
          'evaluate.semantic': [False, True], 'evaluate.num_samples': 12, 'evaluate.round_size': 6,
          'evaluate.kid_subsets': 4, 'evaluate.kid_subset_size': 6, 'evaluate.classifier_steps': 20}
GUIDED_PHASES = ('distill', 'semantic', 'latent', 'evaluate')


def test_two_processes_distil_guided_train_the_predictor_and_evaluate_as_one_process(tmp_path, tiny_run):
  """The same phases in 2 processes x 2 devices and in this process of 4 devices: the guided student, its predictor
  and latent model equal to float32 rounding, and the evaluation (which process 0 runs alone while the other waits)
  gives the same rows."""
  runs = {name: str(tmp_path / name) for name in ('one', 'two')}
  for run in runs.values():
    shutil.copytree(os.path.join(tiny_run[0], 'teacher', 'model'), os.path.join(run, 'teacher', 'model'))
  logs = str(tmp_path / 'logs')
  processes = _start(runs['two'], ','.join(GUIDED_PHASES), logs, overrides=GUIDED)
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in GUIDED.items()}
  pipeline.run_pipeline(tiny.load_config(phases=GUIDED_PHASES, **overrides), runs['one'])
  codes, outputs = _finish(processes, logs)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  one, two = (exports.load(os.path.join(run, 'distill', 'stage_1')) for run in (runs['one'], runs['two']))
  assert exports.read_info(two.path)['attention_guidance']['enabled']  # distilled from the guided teacher
  assert not os.path.exists(os.path.join(runs['two'], 'distill', 'stage_2'))  # end_num_steps=2: one stage
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  jax.tree.map(close, one.params, two.params)
  jax.tree.map(close, (one.semantic.params, one.semantic.latent_params, one.semantic.stats),
               (two.semantic.params, two.semantic.latent_params, two.semantic.stats))
  rows = [evaluate.load_rows(layout.RunLayout(run).evaluate_dir) for run in (runs['one'], runs['two'])]
  assert [(r['model'], r['semantic']) for r in rows[1]] == [('distill/stage_1', False), ('distill/stage_1', True)]
  for a, b in zip(*rows):
    np.testing.assert_allclose([a['fid'], a['kid_mean']], [b['fid'], b['kid_mean']], rtol=1e-3)
  assert _io(runs['two'], 1)['writes'] == []
