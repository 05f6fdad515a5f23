"""Shared by the tests: the tiny config (configs/tiny.py) loaded as a module, and an editable copy of it."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name='tiny', **overrides):
  """configs/<name>.py's config, unlocked so a test can change it, then locked again."""
  spec = importlib.util.spec_from_file_location(f'configs_{name}', os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    for key, value in overrides.items():
      target = config
      *path, last = key.split('.')
      for part in path:
        target = target[part]
      target[last] = value
  return config


def run_step_on(devices, step, init, batch, extra=()):
  """One call of scan_steps(step) jitted over a mesh of `devices`: (state, metrics) fetched to the host.

  init() -> TrainState; batch: host arrays (steps_per_call, batch, ...); extra: the step's replicated arguments.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sferd_jax import sharding
  from sferd_jax.training import steps  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(devices)
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))()
  fn = sharding.jit_step(steps.scan_steps(step), mesh, num_extra_args=len(extra))
  return jax.device_get(fn(state, sharding.put_batch(batch, mesh), jax.random.key(0),
                           *sharding.put_replicated(tuple(extra), mesh)))
