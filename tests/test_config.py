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


@pytest.mark.parametrize('overrides, message', [
    ({'teacher.optimizer.learning_rate': -1.0}, r'teacher\.optimizer\.learning_rate: must be > 0'),
    ({'latent.optimizer.learning_rate': 0.0}, r'latent\.optimizer\.learning_rate: must be > 0'),
    ({'sample.num_steps': 0}, r'sample\.num_steps: must be >= 1, or None'),
    ({'sample.num_steps': -2}, r'sample\.num_steps: must be >= 1, or None'),
    ({'evaluate.num_steps': 0}, r'evaluate\.num_steps: must be >= 1, or None'),
    ({'data.name': 'mnist'}, r"data\.name: unknown source 'mnist'"),
    ({'data.split': 'test'}, r"data\.split: digits has no split 'test'"),
    ({'data.name': 'cifar10', 'data.split': 'valid[:10%]'}, r"data\.split: cifar10 has no split 'valid\[:10%\]'"),
    ({'evaluate.reference_split': 'held_out'}, r"evaluate\.reference_split: digits has no split"),
    ({'allow_changes': ('',)}, r'allow_changes: must be config keys'),
    ({'sample.guidance': True, 'sample.semantic': True}, r'sample\.semantic: cannot be combined'),
])
def test_values_that_cannot_work_are_refused_naming_the_key(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.validate(tiny.load_config(**overrides))


def test_known_splits_and_slices_pass():
  for overrides in ({'sample.num_steps': None}, {'sample.num_steps': 3}, {'data.split': 'all'},
                    {'data.name': 'cifar10', 'data.split': 'train[:10%]', 'model.image_size': 32, 'model.channels': 3,
                     'model.attn_resolutions': (16,)},
                    {'allow_changes': ('distill.optimizer',)}):
    config_lib.validate(tiny.load_config(**overrides))
