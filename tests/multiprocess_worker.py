"""One process of a local multi-process run of the tiny config (tests/test_multiprocess.py starts them):

  python tests/multiprocess_worker.py <process_id> <num_processes> <port> <workdir> <phase,phase,...>

Each process has 2 CPU devices; after the phases, each loads the run's last model and samples it on its own.
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from sferd_jax import sharding  # noqa: E402  pylint: disable=wrong-import-position


def main(process_id, num_processes, port, workdir, phases):
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
  pipeline.run_pipeline(tiny.load_config(phases=tuple(phases.split(','))), workdir)
  images = sferd_jax.load(workdir).sample(jax.random.key(0), num_samples=4)
  print(f'sampled {images.shape}', flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
