"""U-Net: shapes, sown attention, encoder/decoder split, conditioning, dropout, precision, config validation."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sferd_jax.models import unet


def _config(**overrides):
  # Tiny, yet with both attention resolutions, channel changes and resblock resampling.
  base = dict(image_size=8, channels=3, ch=16, emb_ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8, 4),
              num_heads=2, head_dim=None, dropout=0.0, resblock_resample=True, num_classes=0, output_type='x',
              dtype='float32')
  base.update(overrides)
  return ml_collections.ConfigDict(base)


# 16x16x1 digits as in the quickstart: conv resampling, two attention resolutions, heads from head_dim.
QUICKSTART = dict(image_size=16, channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 4),
                  num_heads=None, head_dim=16, resblock_resample=False)
CIFAR10 = dict(image_size=32, channels=3, ch=256, emb_ch=1024, ch_mult=(1, 1, 1), num_res_blocks=3,
               attn_resolutions=(16, 8), num_heads=1, head_dim=None, dropout=0.1, resblock_resample=True)
IMAGENET64 = dict(image_size=64, channels=3, ch=192, emb_ch=768, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                  attn_resolutions=(32, 16, 8), num_heads=None, head_dim=64, resblock_resample=True, num_classes=1000,
                  output_type='both')


def _inputs(config, batch=2, seed=0):
  kz, kl, ky = jax.random.split(jax.random.key(seed), 3)
  size = config.image_size
  z = jax.random.normal(kz, (batch, size, size, config.channels))
  logsnr = jax.random.uniform(kl, (batch,), minval=-15.0, maxval=15.0)
  labels = jax.random.randint(ky, (batch,), 0, config.num_classes) if config.num_classes else None
  return z, logsnr, labels


def _param_shapes(model, config):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        *_inputs(config, batch=1))['params']


def _params(model, config, seed=0):
  """Random params of the model's shapes, without the zero output convs of init, drawn in numpy.

  (A real init compiles hundreds of random initialisers, ~20 s on a busy CPU; init_params has its own test.)
  """
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if shape.ndim > 1:
      return jnp.asarray(rng.normal(size=shape.shape) / np.sqrt(np.prod(shape.shape[:-1])), jnp.float32)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray(is_scale + 0.1 * rng.normal(size=shape.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(model, config))


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, train=False, method=None, mutable=False):
  # One compile of the whole net beats eager's compile of every op on a busy CPU; speed of the code is moot here.
  def apply(variables, *args, rngs=None):
    return model.apply(variables, *args, train=train, method=method, mutable=mutable, rngs=rngs)
  return jax.jit(apply, compiler_options={'xla_backend_optimization_level': 0})


def _apply(model, params, *args, rngs=None, **kwargs):
  return _jitted_apply(model, **kwargs)({'params': params}, *args, rngs=rngs)


def _model_and_params(**overrides):
  config = _config(**overrides)
  model = unet.make_unet(config)
  return config, model, _params(model, config)


@pytest.mark.parametrize('output_type', ['x', 'eps', 'v', 'both'])
@pytest.mark.parametrize('overrides', [{}, QUICKSTART], ids=['tiny', 'quickstart'])
def test_output_shapes(output_type, overrides):
  config = _config(output_type=output_type, **overrides)
  model = unet.make_unet(config)
  z, logsnr, labels = _inputs(config, batch=3)
  out, variables = jax.eval_shape(functools.partial(model.init_with_output, train=False), jax.random.key(0), z,
                                  logsnr, labels)
  params = variables['params']
  assert set(params) == {'encoder', 'decoder'}
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  attn_in_tree = [name for half in params.values() for name in half if name.endswith('_attn')]
  assert sorted(attn_in_tree) == sorted(b.name for b in unet.attention_blocks(config))
  channels = config.channels * (2 if output_type == 'both' else 1)
  assert out.shape == (3, config.image_size, config.image_size, channels) and out.dtype == jnp.float32


def test_init_params_float32_and_zero_output_at_init():
  config = _config(num_classes=3)
  model = unet.make_unet(config)
  params = jax.jit(lambda rng: unet.init_params(model, rng, model_config=config))(jax.random.key(0))
  shapes = _param_shapes(model, config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert not np.any(params['decoder']['conv_out']['kernel'])  # zero-initialised, as in PD
  assert sorted(params['encoder']) == ['class_emb', 'conv_in', 'dense0', 'dense1', 'enc4_0', 'enc4_0_attn',
                                       'enc8_0', 'enc8_0_attn', 'enc8_down']
  assert sorted(params['decoder']) == ['conv_out', 'dec4_0', 'dec4_0_attn', 'dec4_1', 'dec4_1_attn', 'dec4_up',
                                       'dec8_0', 'dec8_0_attn', 'dec8_1', 'dec8_1_attn', 'mid_0', 'mid_1', 'mid_attn',
                                       'norm_out']


def test_sown_attention_maps():
  config, model, params = _model_and_params()
  blocks = {b.name: b for b in unet.attention_blocks(config)}
  assert list(blocks) == ['enc8_0_attn', 'enc4_0_attn', 'mid_attn', 'dec4_0_attn', 'dec4_1_attn', 'dec8_0_attn',
                          'dec8_1_attn']
  wanted = ('enc8_0_attn', 'mid_attn', unet.default_guidance_block(config))
  assert wanted[-1] == 'dec8_1_attn'
  z, logsnr, _ = _inputs(config)
  fused = _apply(model, params, z, logsnr)
  assert np.all(np.isfinite(fused)) and np.abs(fused).max() > 0.1
  model = unet.make_unet(config, capture_attention=wanted)
  out, state = _apply(model, params, z, logsnr, mutable=('intermediates',))
  maps = unet.attention_probs(state['intermediates'])
  assert set(maps) == set(wanted) and unet.attention_probs(state).keys() == maps.keys()
  assert 'attention_probs' in state['intermediates']['decoder']['dec8_1_attn']
  for name, probs in maps.items():
    tokens = blocks[name].resolution**2
    assert probs.shape == (2, config.num_heads, tokens, tokens) and probs.dtype == jnp.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)

  # sow is a no-op without mutable: the same output, bitwise. The explicit path (in an encoder, the middle and a
  # decoder block here) agrees with the fused one.
  np.testing.assert_array_equal(out, _apply(model, params, z, logsnr))
  np.testing.assert_allclose(out, fused, atol=1e-5, rtol=1e-5)


def test_attention_block_names_and_guidance_default():
  names = [b.name for b in unet.attention_blocks(_config(**CIFAR10))]
  assert names[:3] == ['enc16_0_attn', 'enc16_1_attn', 'enc16_2_attn'] and 'mid_attn' in names
  assert len(names) == 3 + 3 + 1 + 4 + 4 and names[-1] == 'dec16_3_attn'
  assert unet.default_guidance_block(_config(**CIFAR10)) == 'dec16_3_attn'
  assert unet.default_guidance_block(_config(**IMAGENET64)) == 'dec32_3_attn'
  assert unet.default_guidance_block(_config(attn_resolutions=())) == 'mid_attn'
  with pytest.raises(ValueError, match='not attention blocks.*mid_attn'):
    unet.make_unet(_config(), capture_attention=('dec16_0_attn',))


def test_encoder_decoder_compose_to_full_model():
  config, model, params = _model_and_params()
  z, logsnr, _ = _inputs(config)
  full = _apply(model, params, z, logsnr)
  # The encoder half alone, from the full model's params, two ways.
  h, skips, emb = _apply(model, params, z, logsnr, method=unet.UNet.encode)
  assert h.shape == (2, 4, 4, 32) and emb.shape == (2, config.emb_ch) and len(skips) == 1 + 2 * 1 + 1
  fields = {k: getattr(model, k) for k in ('ch', 'emb_ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions',
                                            'out_channels', 'num_heads', 'head_dim', 'resblock_resample')}
  encoded = _apply(unet.UNetEncoder(**fields), params['encoder'], z, logsnr)
  chex.assert_trees_all_equal(encoded, (h, skips, emb))
  np.testing.assert_array_equal(full, _apply(model, params, *encoded, method=unet.UNet.decode))


def test_class_conditioning():
  config, model, params = _model_and_params(num_classes=5)
  assert params['encoder']['class_emb']['embedding'].shape == (5, config.emb_ch)
  z, logsnr, _ = _inputs(config)
  # The same (z, logsnr) twice: only the example whose label changed changes.
  out = _apply(model, params, jnp.tile(z, (2, 1, 1, 1)), jnp.tile(logsnr, 2), jnp.array([0, 1, 2, 1]))
  assert not np.allclose(out[0], out[2])
  np.testing.assert_allclose(out[1], out[3], atol=1e-6)
  with pytest.raises(ValueError, match='class-conditional.*pass labels'):
    _apply(model, params, z, logsnr, None)
  with pytest.raises(ValueError, match='unconditional'):
    jax.eval_shape(functools.partial(unet.make_unet(_config()).init, train=False), jax.random.key(0), z, logsnr,
                   jnp.array([0, 1]))


def test_dropout_only_when_training():
  config, model, params = _model_and_params(dropout=0.5)
  z, logsnr, _ = _inputs(config)
  eval_out = _apply(model, params, z, logsnr)
  train = [_apply(model, params, z, logsnr, train=True, rngs={'dropout': jax.random.key(k)}) for k in (1, 2, 1)]
  assert not np.allclose(train[0], eval_out) and not np.allclose(train[0], train[1])
  np.testing.assert_array_equal(train[0], train[2])


def test_bfloat16_compute_returns_float32_close_to_float32():
  config, model, params = _model_and_params()
  z, logsnr, _ = _inputs(config)
  ref = _apply(model, params, z, logsnr)
  low = unet.make_unet(_config(dtype='bfloat16'), capture_attention=('mid_attn',))
  out, state = _apply(low, params, z, logsnr, mutable=('intermediates',))
  assert out.dtype == jnp.float32 and unet.attention_probs(state)['mid_attn'].dtype == jnp.float32
  assert np.abs(out - ref).max() < 0.03 * np.abs(ref).max()
  assert unet.make_unet(_config(dtype=jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize('overrides, message', [
    (dict(image_size=10, ch_mult=(1, 2, 2)), 'not divisible by 2\\*\\*\\(len\\(ch_mult\\) - 1\\) = 4'),
    (dict(attn_resolutions=(4, 2)), r'\[2\] are never reached; the net sees resolutions \[8, 4\]'),
    (dict(num_heads=2, head_dim=8), 'exactly one of model.num_heads'),
    (dict(num_heads=0, head_dim=None), 'exactly one of model.num_heads'),
    (dict(num_heads=None, head_dim=12), 'enc8_0_attn has 16 channels, not divisible by head_dim=12'),
    (dict(num_heads=3), 'not divisible by num_heads=3'),
    (dict(output_type='score'), 'output_type must be one of'),
    (dict(dtype='float16'), 'dtype must be one of'),
    (dict(ch=18, num_heads=1), 'GroupNorm .* does not divide C=18'),
])
def test_validate_model_config_says_what_to_change(overrides, message):
  with pytest.raises(ValueError, match=message):
    unet.validate_model_config(_config(**overrides))
  with pytest.raises(ValueError, match=message):
    unet.make_unet(_config(**overrides))


def test_reference_configs_have_pd_param_counts():
  # PD's CIFAR-10 U-Net exactly; ImageNet-64 is PD's minus the 768 biases of its one-hot class Dense (nn.Embed).
  # One attention block of the CIFAR net is 263,680 parameters, so a structural slip cannot hide in a tolerance.
  assert unet.param_count(_config(**CIFAR10)) == 60_004_099
  assert unet.param_count(_config(**IMAGENET64)) == 295_904_454


def test_attention_token_order_matches_the_risky_mask():
  """A block whose every query attends to one grid cell: risky_mask marks exactly that cell's pixels, so the
  U-Net's (h, w) -> token order and the mask's token -> (h, w) order agree."""
  from sferd_jax.models import layers  # pylint: disable=g-import-not-at-top
  from sferd_jax.sferd import guided_teacher  # pylint: disable=g-import-not-at-top
  block = layers.AttnBlock(num_heads=1, capture=True)
  y0, x0 = 1, 3  # asymmetric, so a transposed reshape would mark (3, 1)
  h = jnp.zeros((1, 4, 4, 8)).at[0, y0, x0, 0].set(10.0)
  params = jax.jit(block.init)(jax.random.key(0), h)['params']
  params = dict(params, q={'kernel': jnp.zeros_like(params['q']['kernel']), 'bias': jnp.ones_like(params['q']['bias'])},
                k={'kernel': jnp.zeros_like(params['k']['kernel']).at[0].set(5.0), 'bias': params['k']['bias']})
  _, state = jax.jit(lambda p, h: block.apply({'params': p}, h, mutable=['intermediates']))(params, h)
  mask = guided_teacher.risky_mask(state['intermediates']['attention_probs'][0], image_hw=(8, 8))[0, ..., 0]
  expected = np.zeros((8, 8))
  expected[2 * y0:2 * y0 + 2, 2 * x0:2 * x0 + 2] = 1
  np.testing.assert_array_equal(mask, expected)
