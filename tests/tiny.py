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
