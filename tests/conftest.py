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
