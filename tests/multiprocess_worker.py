"""One process of a local multi-process run of the tiny config (tests/test_multiprocess.py starts them):

  python tests/multiprocess_worker.py <process_id> <num_processes> <port> <workdir> <phase,phase,...> [<options>]

Each process has 2 CPU devices; after the phases, each loads the run's last model and samples it on its own. It
records, in <workdir>.io/process_<id>.json, the example indices it read per phase and step and the project files it
wrote. <options>, JSON: {"kill_after": k} kills the teacher phase at batch k in every process (as a preemption
would); {"overrides": {key: value}} changes the tiny config (tiny.load_config's keyword arguments).
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from sferd_jax import sharding  # noqa: E402  pylint: disable=wrong-import-position


def _record_io(record):
  """Notes every batch this process reads and every project file it writes (files.py is the only writer)."""
  from sferd_jax import files  # pylint: disable=g-import-not-at-top
  from sferd_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  get, atomic_path, append_text = data_pipeline.Batches.get, files.atomic_path, files.append_text

  def recording_get(self, step, num_steps=1):
    if not hasattr(self, 'recorded_as'):  # one Batches per phase or stage, made in the same order everywhere
      self.recorded_as = str(len(record['reads']))
      record['reads'][self.recorded_as] = {}
    record['reads'][self.recorded_as][str(step)] = self.indices(step, num_steps)[0].tolist()
    return get(self, step, num_steps)

  def recording_atomic_path(path):
    record['writes'].append(path)
    return atomic_path(path)

  def recording_append_text(path, text):
    record['writes'].append(path)
    return append_text(path, text)

  data_pipeline.Batches.get = recording_get
  files.atomic_path = recording_atomic_path
  files.append_text = recording_append_text


def _kill_teacher_at(after):
  import test_training  # pylint: disable=g-import-not-at-top
  from sferd_jax.training import phases  # pylint: disable=g-import-not-at-top
  real = phases.make_batches
  phases.make_batches = lambda config, spec: (test_training._Interrupting(real(config, spec), after)
                                              if spec.name == 'teacher' else real(config, spec))


def main(process_id, num_processes, port, workdir, phases, options='{}'):
  options = json.loads(options)
  sharding.use_gloo_on_cpu()
  # A short heartbeat: when a process dies, the others stop within seconds rather than JAX's default 100 s.
  jax.distributed.initialize(f'localhost:{port}', num_processes, process_id, heartbeat_timeout_seconds=10)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)  # the phases' progress and skip lines, for the test to read
  import tiny  # pylint: disable=g-import-not-at-top
  import sferd_jax  # pylint: disable=g-import-not-at-top
  from sferd_jax import pipeline  # pylint: disable=g-import-not-at-top
  print(f'process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of '
        f'{jax.device_count()} devices', flush=True)
  record = {'reads': {}, 'writes': []}
  _record_io(record)
  if options.get('kill_after'):
    _kill_teacher_at(options['kill_after'])
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in options.get('overrides', {}).items()}
  try:
    pipeline.run_pipeline(tiny.load_config(phases=tuple(phases.split(',')), **overrides), workdir)
  finally:
    os.makedirs(workdir + '.io', exist_ok=True)
    with open(os.path.join(workdir + '.io', f'process_{process_id}.json'), 'w') as f:
      json.dump(record, f)
  images = sferd_jax.load(workdir).sample(jax.random.key(0), num_samples=4)
  print(f'sampled {images.shape}', flush=True)


if __name__ == '__main__':
  main(*(int(a) if i < 2 else a for i, a in enumerate(sys.argv[1:])))
