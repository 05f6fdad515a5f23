"""Test set-up: CPU only, offline, with 4 fake devices for the sharding tests."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
# A stray TFDS download hangs for minutes on a machine without network: make it fail at once.
os.environ.setdefault('TFDS_DATA_DIR', '/nonexistent-tfds-data-dir-for-tests')
os.environ.setdefault('NO_GCE_CHECK', 'true')
