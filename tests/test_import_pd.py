"""tools/import_pd: a progressive-distillation (PD) checkpoint becomes an export whose U-Net computes what PD's own
net computes (tests/pd_unet_reference.py, PD's unet.py), samples, and distils; trees that do not fit are refused with
the path where the import stopped."""

import json
import os

import flax
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pd_unet_reference as pd_ref
from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax import exports
from sferd_jax.tools import import_pd

# Tiny PD nets (8x8 images, two levels, one res block). Width 128 is the narrowest at which our GroupNorm has PD's
# 32 groups (narrower nets are refused, see test_narrow_net_is_refused).
UNCONDITIONAL = dict(num_classes=1, ch=128, emb_ch=64, out_ch=3, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), num_heads=2, head_dim=None, dropout=0.0, logsnr_input_type='inv_cos',
                     resblock_resample=True)
# Class-conditional, PD's 'both' output, conv resampling, heads from head_dim (2 heads at 8x8, 4 in the middle).
CONDITIONAL = dict(num_classes=5, ch=128, emb_ch=64, out_ch=6, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(8,), num_heads=None, head_dim=64, dropout=0.0, logsnr_input_type='inv_cos',
                   resblock_resample=False)
IMAGE_SIZE = 8

# PD's config/cifar_base.py and config/imagenet64_base.py model.args (dropout aside), and the data's classes
# (num_classes=1: unconditional) and output channels (mean_type x; both).
PD_CIFAR10 = dict(num_classes=1, ch=256, emb_ch=1024, out_ch=3, ch_mult=(1, 1, 1), num_res_blocks=3,
                  attn_resolutions=(8, 16), num_heads=1, head_dim=None, dropout=0.2, logsnr_input_type='inv_cos',
                  resblock_resample=True)
PD_IMAGENET64 = dict(num_classes=1000, ch=192, emb_ch=768, out_ch=6, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                     attn_resolutions=(8, 16, 32), num_heads=None, head_dim=64, dropout=0.1,
                     logsnr_input_type='inv_cos', resblock_resample=True)


def _shapes(settings, image_size):
  model = pd_ref.UNet(**settings)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
      train=False))['params']


def pd_params(settings, seed=0):
  """Random parameters of PD's net, as nested dicts of numpy arrays (none zero, unlike PD's init of the output
  convs; drawn in numpy, which is faster than compiling the initialisers)."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if len(shape.shape) > 1:  # kernels: unit-variance outputs (a DenseGeneral's q/k/v fan-in is its first axis)
      fan_in = shape.shape[0] if len(shape.shape) == 3 and 'proj_out' not in jax.tree_util.keystr(path) \
          else np.prod(shape.shape[:-1])
      return (rng.normal(size=shape.shape) / np.sqrt(fan_in)).astype(np.float32)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return (is_scale + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)

  return flax.core.unfreeze(jax.tree_util.tree_map_with_path(draw, _shapes(settings, IMAGE_SIZE)))


def pd_state(ema_params, *, step, num_sample_steps=0, seed=1):
  """PD's checkpoint content: the state dict of model.TrainState(step, optimizer, ema_params, num_sample_steps),
  whose optimizer is a flax.optim Adam Optimizer ({'target', 'state': {'step', 'param_states'}}). The raw weights
  (optimizer/target) differ from the EMA ones, so a test sees which were imported."""
  rng = np.random.default_rng(seed)
  target = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), ema_params)
  param_states = jax.tree.map(lambda x: {'grad_ema': np.zeros_like(x), 'grad_sq_ema': np.zeros_like(x)}, target)
  return {'step': np.asarray(step, np.int32),
          'optimizer': {'target': target, 'state': {'step': np.asarray(step, np.int32), 'param_states': param_states}},
          'ema_params': ema_params,
          'num_sample_steps': num_sample_steps}


def write_checkpoint(folder, state, step):
  """As PD's checkpoints.save_checkpoint: flax.serialization.to_bytes of the state, in <folder>/checkpoint_<step>."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f'checkpoint_{step}')
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(state))
  return path


def _inputs(num_classes, batch=4, seed=0):
  kz, ky = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(kz, (batch, IMAGE_SIZE, IMAGE_SIZE, 3))
  logsnr = jnp.array([-20.0, -3.7, 2.2, 20.0])[:batch]
  labels = jax.random.randint(ky, (batch,), 0, num_classes).astype(jnp.int32) if num_classes > 1 else None
  return z, logsnr, labels


def _pd_forward(settings, params, z, logsnr, labels):
  y = labels if labels is not None else jnp.zeros(z.shape[:1], jnp.int32)
  return pd_ref.UNet(**settings).apply({'params': params}, z, logsnr, y, train=False)


def _our_forward(model, z, logsnr, labels):
  from sferd_jax.models import unet  # pylint: disable=g-import-not-at-top
  net = unet.make_unet(model.config.model)
  return net.apply({'params': model.params}, z, logsnr, labels, train=False)


@pytest.mark.parametrize('settings,flags,expected', [
    (UNCONDITIONAL, ['--image_size=8', '--output_type=x', '--num_steps=8'],
     dict(ch=128, emb_ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2, head_dim=None,
          resblock_resample=True, num_classes=0, output_type='x')),
    (CONDITIONAL, ['--image_size=8', '--num_steps=16'],
     dict(ch=128, emb_ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=None, head_dim=64,
          resblock_resample=False, num_classes=5, output_type='both')),
], ids=['unconditional', 'class_conditional'])
def test_import_equals_pd_forward_pass_and_samples(tmp_path, capsys, settings, flags, expected):
  ema = pd_params(settings)
  folder = str(tmp_path / 'pd_run')
  write_checkpoint(folder, pd_state(pd_params(settings, seed=5), step=100), 100)  # older: not taken
  write_checkpoint(folder, pd_state(ema, step=2000, num_sample_steps=0), 2000)
  export = str(tmp_path / 'export')
  import_pd.main([folder, export, *flags])
  assert 'imported' in capsys.readouterr().out

  model = exports.load(export)
  for key, value in expected.items():
    assert tuple(model.config.model[key]) == value if isinstance(value, tuple) else model.config.model[key] == value
  info = json.load(open(os.path.join(export, 'model.json')))
  assert info['phase'] == 'teacher' and info['diffusion'] == dict(logsnr_min=-20.0, logsnr_max=20.0)
  assert info['imported_from']['step'] == 2000 and info['imported_from']['params'] == 'ema_params'
  assert info['imported_from']['checkpoint'].endswith('checkpoint_2000') and 'imported' in info['data']
  assert info['num_steps'] == (16 if settings is CONDITIONAL else 8) == model.config.num_steps

  z, logsnr, labels = _inputs(settings['num_classes'])
  want = np.asarray(_pd_forward(settings, ema, z, logsnr, labels))
  got = np.asarray(_our_forward(model, z, logsnr, labels))
  assert got.shape == want.shape == (4, IMAGE_SIZE, IMAGE_SIZE, settings['out_ch'])
  assert np.abs(want).max() > 0.1  # a real output, not the zero of an initial conv_out
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=1e-5)

  images = model.sample(jax.random.key(0), num_samples=4, num_steps=2)
  assert images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8


def test_num_steps_come_from_the_checkpoint_or_flags(tmp_path):
  """A distilled student records its step count (num_sample_steps); a base model's is 0, so a flag must say it."""
  ema = pd_params(UNCONDITIONAL)
  student = write_checkpoint(str(tmp_path / 'student'), pd_state(ema, step=7, num_sample_steps=8), 7)
  info = import_pd.import_checkpoint(student, str(tmp_path / 'a'), image_size=8, output_type='v')
  assert info['num_steps'] == 8 and info['model']['output_type'] == 'v'
  base = write_checkpoint(str(tmp_path / 'base'), pd_state(ema, step=7), 7)
  with pytest.raises(errors.CheckpointError, match='--num_steps'):
    import_pd.import_checkpoint(base, str(tmp_path / 'b'), image_size=8, output_type='x')
  assert not os.path.exists(str(tmp_path / 'b'))
  assert import_pd.import_checkpoint(base, str(tmp_path / 'c'), image_size=8, output_type='x',
                                     num_steps=64)['num_steps'] == 64


def test_raw_weights_only_when_there_is_no_ema(tmp_path, capsys):
  state = pd_state(pd_params(UNCONDITIONAL), step=3)
  del state['ema_params']
  path = write_checkpoint(str(tmp_path / 'run'), state, 3)
  info = import_pd.import_checkpoint(path, str(tmp_path / 'export'), image_size=8, output_type='x', num_steps=4)
  assert info['imported_from']['params'] == 'optimizer/target' and 'no ema_params' in capsys.readouterr().err
  got = exports.load(str(tmp_path / 'export')).params['encoder']['conv_in']['kernel']
  np.testing.assert_array_equal(np.asarray(got), state['optimizer']['target']['conv_in']['kernel'])


def test_flattened_attention_kernels_of_older_flax(tmp_path):
  """Some Flax versions stored DenseGeneral parameters flattened; PD's loader reshapes them, so does the import
  (heads from a flag, as a flattened kernel cannot say them)."""
  tree = pd_params(CONDITIONAL)
  flat = jax.tree.map(np.copy, tree)
  for name in ('down_0.attn_0', 'mid.attn_1', 'up_0.attn_0', 'up_0.attn_1'):
    for leaf in ('q', 'k', 'v'):
      kernel, bias = flat[name][leaf]['kernel'], flat[name][leaf]['bias']
      flat[name][leaf] = {'kernel': kernel.reshape(kernel.shape[0], -1), 'bias': bias.reshape(-1)}
    kernel = flat[name]['proj_out']['kernel']
    flat[name]['proj_out']['kernel'] = kernel.reshape(-1, kernel.shape[-1])
  with pytest.raises(errors.CheckpointError,
                     match=r'ema_params/down_0\.attn_0/q/kernel is stored flattened.*--num_heads'):
    import_pd.infer_model_config(flat, image_size=8)
  config = import_pd.infer_model_config(flat, image_size=8, head_dim=64)
  assert config == import_pd.infer_model_config(tree, image_size=8)
  converted = import_pd.convert_params(flat, config)
  jax.tree.map(np.testing.assert_array_equal, converted, import_pd.convert_params(tree, config))
  with pytest.raises(errors.CheckpointError, match=r'down_0\.attn_0/q/kernel: 128 channels in 2 heads do not fit '
                                                   r'num_heads=4'):
    import_pd.infer_model_config(tree, image_size=8, num_heads=4)


def _refused(tmp_path, tree, match, **flags):
  path = write_checkpoint(str(tmp_path / 'bad'), pd_state(tree, step=1), 1)
  export = str(tmp_path / 'bad_export')
  with pytest.raises(errors.CheckpointError, match=match):
    import_pd.import_checkpoint(path, export, **dict(dict(image_size=8, output_type='x', num_steps=4), **flags))
  assert not os.path.exists(export)


def test_trees_that_do_not_fit_are_refused_with_their_path(tmp_path):
  good = pd_params(UNCONDITIONAL)
  copy = lambda: jax.tree.map(np.copy, good)

  renamed = copy()
  renamed['up_0.block_1']['norm_2'] = renamed['up_0.block_1'].pop('norm2')
  _refused(tmp_path, renamed, r'missing parameter ema_params/up_0\.block_1/norm2/(bias|scale) \(its module has '
                              r'instead: .*ema_params/up_0\.block_1/norm_2/')

  reshaped = copy()
  reshaped['down_1.block_0']['conv2']['kernel'] = reshaped['down_1.block_0']['conv2']['kernel'][..., :255]
  _refused(tmp_path, reshaped, r'ema_params/down_1\.block_0/conv2/kernel has shape \(3, 3, 256, 255\); .* needs '
                               r'\(3, 3, 256, 256\)')

  bias = copy()
  bias['mid.attn_1']['q']['bias'] = bias['mid.attn_1']['q']['bias'][:1]
  _refused(tmp_path, bias, r'ema_params/mid\.attn_1/q/bias has shape \(1, 128\)')

  module = copy()
  module['down_1.attention_0'] = module.pop('down_1.attn_0')
  _refused(tmp_path, module, r'unexpected module ema_params/down_1\.attention_0')

  extra = copy()
  extra['mid.block_1']['extra'] = {'kernel': np.zeros((2, 2), np.float32)}
  _refused(tmp_path, extra, r'unexpected parameter ema_params/mid\.block_1/extra/kernel')

  missing_block = copy()
  del missing_block['up_1.block_1']
  _refused(tmp_path, missing_block, r'missing parameter ema_params/up_1\.block_1/')

  _refused(tmp_path, good, r'does not have the cifar10 preset\'s architecture', preset='cifar10', image_size=None,
           output_type=None)


def test_narrow_net_is_refused(tmp_path):
  """PD's GroupNorm has 32 groups, ours min(32, C // 4): below 128 channels they differ, so the import refuses."""
  narrow = dict(UNCONDITIONAL, ch=32, emb_ch=32)
  _refused(tmp_path, pd_params(narrow), r'ema_params/.*norm.*: a GroupNorm over (32|64|96) channels; PD normalises '
                                        r'in 32 groups')


def test_files_that_are_not_pd_checkpoints(tmp_path, capsys):
  junk = tmp_path / 'junk'
  junk.write_bytes(b'\x00not msgpack at all')
  with pytest.raises(errors.CheckpointError, match='not a Flax msgpack checkpoint'):
    import_pd.import_checkpoint(str(junk), str(tmp_path / 'e1'), image_size=8)
  other = tmp_path / 'other'
  other.write_bytes(serialization.msgpack_serialize({'params': {'w': np.zeros(2)}}))
  with pytest.raises(errors.CheckpointError, match=r"no ema_params or optimizer.target or none parameter tree .*"
                                                   r"\['params'\]"):
    import_pd.import_checkpoint(str(other), str(tmp_path / 'e2'), image_size=8)
  with pytest.raises(errors.CheckpointError, match='without checkpoint_<step> files'):
    import_pd.import_checkpoint(str(tmp_path), str(tmp_path / 'e3'), image_size=8)
  # The command line: one line on stderr, exit status 2, as sferd_jax.main.
  with pytest.raises(SystemExit) as exit_info:
    import_pd.main([str(tmp_path / 'nothing'), str(tmp_path / 'e4')])
  assert exit_info.value.code == errors.USER_ERROR_EXIT_CODE
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'does not exist' in err and len(err.strip().splitlines()) == 1


def test_an_export_is_never_overwritten(tmp_path):
  path = write_checkpoint(str(tmp_path / 'run'), pd_state(pd_params(UNCONDITIONAL), step=1), 1)
  flags = dict(image_size=8, output_type='x', num_steps=4)
  import_pd.import_checkpoint(path, str(tmp_path / 'export'), **flags)
  before = open(tmp_path / 'export' / 'model.json').read()
  with pytest.raises(errors.CheckpointError, match='never overwritten'):
    import_pd.import_checkpoint(path, str(tmp_path / 'export'), **flags)
  assert open(tmp_path / 'export' / 'model.json').read() == before


@pytest.mark.parametrize('preset,settings,image_size,ours', [
    ('cifar10', PD_CIFAR10, 32, config_lib.CIFAR10_UNET),
    ('imagenet64', PD_IMAGENET64, 64, config_lib.IMAGENET64_UNET),
])
def test_presets_read_pd_published_nets_as_our_configs(preset, settings, image_size, ours):
  """The trees of PD's published CIFAR-10 and ImageNet 64 nets (shapes only: zero-size broadcasts) read as our
  CIFAR10_UNET and IMAGENET64_UNET, whose exports configs/cifar10_stage.py and imagenet64_stage.py distil."""
  tree = flax.core.unfreeze(jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape),
                                         _shapes(settings, image_size)))
  config = import_pd.infer_model_config(tree, preset=import_pd.PRESETS[preset]['model'])
  assert config == dict(ours, ch_mult=tuple(ours['ch_mult']), attn_resolutions=tuple(ours['attn_resolutions']))
  # Without a preset, the flags say what the tree cannot.
  flags = dict(image_size=image_size, output_type=ours['output_type'] if ours['output_type'] != 'both' else None)
  bare = import_pd.infer_model_config(tree, **flags)
  assert {k: v for k, v in bare.items() if k != 'dropout'} == {k: v for k, v in config.items() if k != 'dropout'}
