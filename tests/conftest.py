"""Test set-up: CPU only, offline, with 4 fake devices for the sharding tests."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
# A stray TFDS download hangs for minutes on a machine without network: make it fail at once.
os.environ.setdefault('TFDS_DATA_DIR', '/nonexistent-tfds-data-dir-for-tests')
os.environ.setdefault('NO_GCE_CHECK', 'true')

import tempfile  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402  pylint: disable=wrong-import-position

# Several tests compile the same tiny steps; a persistent cache shared by the xdist workers compiles each once.
jax.config.update('jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'sferd_jax_test_jit_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


import pytest  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """The whole tiny pipeline, run once per test process: a teacher, distillation 4 -> 2 -> 1 steps, and the
  semantic predictor and latent model of the last stage. Returns (workdir, traces): traces counts how often the
  distill step was traced."""
  from sferd_jax import pipeline  # pylint: disable=g-import-not-at-top
  from sferd_jax.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  import tiny  # pylint: disable=g-import-not-at-top
  traces = []
  real = steps_lib.make_distill_step

  def counting(**kwargs):
    step = real(**kwargs)

    def traced(*args):
      traces.append(1)
      return step(*args)
    return traced

  steps_lib.make_distill_step = counting
  try:
    workdir = str(tmp_path_factory.mktemp('tiny_run'))
    pipeline.run_pipeline(tiny.load_config(), workdir)
  finally:
    steps_lib.make_distill_step = real
  return workdir, traces
