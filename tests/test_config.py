"""Every config loads, validates, is locked, and every one of its keys can be set from the command line."""

import glob
import os

import ml_collections
import pytest

from sferd_jax import config as config_lib
from sferd_jax import errors
import tiny

CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(tiny.ROOT, 'configs', '*.py')))


def _leaves(config, prefix=''):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', config.get_ref(key)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates_and_is_locked(name):
  config = config_lib.validate(tiny.load_config(name))
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.model.chanels = 3  # a typo is an error, not a new key
  # One schema, plus a study section in study configs (--mode=study).
  assert set(config.keys()) - {'study'} == set(config_lib.base_config().keys())


@pytest.mark.parametrize('name', CONFIGS)
def test_every_key_has_a_type_the_command_line_can_override(name):
  # ml_collections' config_flags refuses to override a key whose value is a plain None (no type).
  for key, ref in _leaves(tiny.load_config(name)):
    assert ref.get_type() is not type(None), f'configs/{name}.py: config.{key} is a plain None; use _optional()'


def test_configs_share_one_schema():
  base = sorted(k for k, _ in _leaves(config_lib.base_config()))
  study = sorted(f'study.{k}' for k, _ in _leaves(config_lib.study_config()))
  for name in CONFIGS:
    keys = sorted(k for k, _ in _leaves(tiny.load_config(name)))
    assert keys in (base, sorted(base + study)), name


def test_validation_names_the_key_and_the_fix():
  for overrides, message in (
      ({'teacher.optimizer.weight_decay': 0.1}, "name='adamw'"),
      ({'teacher.loss': 'l1'}, 'config.teacher.loss'),
      ({'distill.steps_per_call': 3}, r'config.distill.steps_per_call: must divide train_steps=2 .* steps_per_call=1'),
      ({'phases': ('teacher', 'finetune')}, "unknown phase 'finetune'"),
      ({'sample.sampler': 'euler'}, 'config.sample.sampler'),
      ({'data.name': 'npz'}, 'config.data.path'),
      ({'evaluate.features': 'clip'}, 'config.evaluate.features'),
      ({'phases': ('teacher', 'evaluate'), 'evaluate.features': 'inception'}, 'export_inception'),
  ):
    with pytest.raises(errors.ConfigError, match=message):
      config_lib.validate(tiny.load_config(**overrides))
