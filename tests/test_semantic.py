"""Semantic encoder, gradient predictor (both forms) and the semantic shift and loss of the frozen student."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sferd_jax.diffusion import losses
from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers
from sferd_jax.models import semantic
from sferd_jax.models import unet
from sferd_jax.sferd import semantic_predictor as sg

# One compile of a whole forward beats eager's compile of every op on a busy CPU; the code's speed is moot here.
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _model_config(**overrides):
  # Tiny, yet with attention in the decoder, a channel change across levels and resblock resampling.
  base = dict(image_size=8, channels=3, ch=8, emb_ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
              num_heads=2, head_dim=None, dropout=0.0, resblock_resample=True, num_classes=0, output_type='v',
              dtype='float32')
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def _semantic_config(**overrides):
  base = dict(latent_dim=6, encoder_ch=8, form='shift', separate_ch=8, gradient_param='x_shift')
  base.update(overrides)
  return ml_collections.ConfigDict(base)


def _random_like(shapes, seed, zero_out=True):
  """Random params of these shapes drawn in numpy (no initialiser compiles); conv_out zero, as init has it."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    key = jax.tree_util.keystr(path)
    if zero_out and "['conv_out']" in key:
      return jnp.zeros(shape.shape, jnp.float32)
    if len(shape.shape) > 1:
      return jnp.asarray(rng.normal(size=shape.shape) / np.sqrt(np.prod(shape.shape[:-1])), jnp.float32)
    return jnp.asarray(key.endswith("['scale']") + 0.1 * rng.normal(size=shape.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _perturb_conv_out(params, seed=1, scale=0.3):
  rng = np.random.default_rng(seed)
  conv_out = {k: jnp.asarray(scale * rng.normal(size=v.shape), jnp.float32) for k, v in params['conv_out'].items()}
  return {**params, 'conv_out': conv_out}


class _Setup:
  """A tiny student, its semantic models and numpy-random params of all three (conv_outs zero)."""

  def __init__(self, batch=3, **semantic_overrides):
    self.model_config = _model_config()
    self.student = unet.make_unet(self.model_config)
    semantic_config = _semantic_config(**semantic_overrides)
    self.encoder, self.predictor = semantic.make_semantic_models(self.model_config, semantic_config)
    self.gradient_param = semantic_config.gradient_param
    size, channels = self.model_config.image_size, self.model_config.channels
    z0 = jnp.zeros((1, size, size, channels))
    self.student_params = _random_like(jax.eval_shape(
        functools.partial(self.student.init, train=False), jax.random.key(0), z0, jnp.zeros((1,)))['params'], 0,
                                       zero_out=False)
    shapes = jax.eval_shape(functools.partial(semantic.init_semantic_params, self.encoder, self.predictor,
                                              model_config=self.model_config), jax.random.key(0))
    self.semantic_params = _random_like(shapes, 2)
    keys = jax.random.split(jax.random.key(3), 4)
    shape = (batch, size, size, channels)
    self.x0 = jax.random.uniform(keys[0], shape, minval=-1.0, maxval=1.0)
    self.eps = jax.random.normal(keys[1], shape)
    # The student's own noise levels, the 1-step student's lambda = -20 among them.
    self.logsnr = jnp.array([-20.0, -3.0, 4.0][:batch])
    self.z = process.diffuse(x=self.x0, eps=self.eps, logsnr=self.logsnr)
    self.target = process.from_x(x=jnp.clip(self.x0 + 0.2 * jax.random.normal(keys[2], shape), -1, 1), z=self.z,
                                 logsnr=self.logsnr)


@functools.lru_cache(maxsize=None)
def _setup(**kwargs):
  return _Setup(**kwargs)


def _forward(setup):
  """Jitted (student pred, z_sem, g, shifted pred) for (semantic params, x0)."""

  @_jit
  def forward(semantic_params, x0):
    pred, features = sg.frozen_student(setup.student, setup.student_params, setup.z, setup.logsnr,
                                       output_type=setup.model_config.output_type)
    z_sem = setup.encoder.apply({'params': semantic_params['encoder']}, x0)
    g = sg.predict_gradient(setup.predictor, semantic_params['predictor'], z=setup.z, logsnr=setup.logsnr,
                            z_sem=z_sem, features=features, gradient_param=setup.gradient_param)
    return pred, z_sem, g, sg.shifted_prediction(pred=pred, g=g, z=setup.z, logsnr=setup.logsnr)

  return forward


# The semantic encoder.


def test_encoder_stages():
  assert semantic.encoder_stages(8) == [4, 2]
  assert semantic.encoder_stages(16) == [8, 4]
  assert semantic.encoder_stages(32) == [16, 8, 4]
  assert semantic.encoder_stages(64) == [32, 16, 8, 4]
  assert semantic.encoder_stages(28) == [14, 7, 4]  # Fashion-MNIST: SAME padding rounds up


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('size', [8, 16, 32, 64])
def test_encoder_output_shapes(size, channels):
  encoder = semantic.SemanticEncoder(latent_dim=12, ch=8, image_size=size)
  x = jnp.zeros((2, size, size, channels))
  z_sem, variables = jax.eval_shape(encoder.init_with_output, jax.random.key(0), x)
  assert z_sem.shape == (2, 12) and z_sem.dtype == jnp.float32
  params = variables['params']
  stages = semantic.encoder_stages(size)
  assert sorted(k for k in params if k.startswith('conv')) == [f'conv{i}' for i in range(len(stages))]
  assert 'attn' in params
  widest = 8 * min(2**(len(stages) - 1), 4)
  assert params['out']['kernel'].shape == (stages[-1]**2 * widest, 12)


def test_encoder_matches_pdae_size_at_64px_and_rejects_other_sizes():
  encoder = semantic.SemanticEncoder(latent_dim=512, ch=64, image_size=64)
  params = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
  assert params['out']['kernel'].shape == (4096, 512)  # PDAE's flatten size
  assert params['attn']['q']['kernel'].shape[0] == 128  # attention after the second stage, at 16 x 16
  with pytest.raises(ValueError, match='built for 64 px'):
    jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# The gradient predictor, 'shift' form.


def test_init_semantic_params_layout_and_zero_output():
  setup = _setup()
  params = _jit(functools.partial(semantic.init_semantic_params, setup.encoder, setup.predictor,
                                  model_config=setup.model_config))(jax.random.key(0))
  assert set(params) == {'encoder', 'predictor'}
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert not np.any(params['predictor']['conv_out']['kernel']) and not np.any(params['predictor']['conv_out']['bias'])
  student_decoder = set(setup.student_params['decoder'])
  assert set(params['predictor']) == student_decoder | {'z_embed'}
  block = params['predictor']['dec4_0']
  assert set(block) == set(setup.student_params['decoder']['dec4_0']) | {'zemb_proj'}
  assert params['predictor']['z_embed']['kernel'].shape == (6, setup.model_config.emb_ch)
  assert block['zemb_proj']['kernel'].shape == (setup.model_config.emb_ch, 2 * 16)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(setup.semantic_params)


def test_zero_output_gives_the_plain_student_bitwise():
  setup = _setup()
  pred, z_sem, g, shifted = _forward(setup)(setup.semantic_params, setup.x0)
  assert z_sem.shape == (3, 6) and g.shape == setup.z.shape and g.dtype == jnp.float32
  assert not np.any(g)
  for name in ('x', 'eps', 'v'):  # a 'v' student: eps and v are not re-derived from x, so this is exact
    np.testing.assert_array_equal(getattr(shifted, name), getattr(pred, name))
  # The frozen student's pass (encoder then decoder) is the full U-Net's prediction.
  full = _jit(lambda p: setup.student.apply({'params': p}, setup.z, setup.logsnr, train=False))(setup.student_params)
  expect = process.predict(output=full, z=setup.z, logsnr=setup.logsnr, output_type='v')
  np.testing.assert_allclose(pred.x, expect.x, rtol=1e-5, atol=1e-5)


def test_perturbed_output_gives_a_gradient_that_depends_on_z_sem():
  setup = _setup()
  forward = _forward(setup)
  params = {**setup.semantic_params, 'predictor': _perturb_conv_out(setup.semantic_params['predictor'])}
  pred, z_sem, g, shifted = forward(params, setup.x0)
  assert np.all(np.isfinite(g)) and np.all(np.abs(g).reshape(3, -1).max(axis=1) > 0)
  # Another image, another code, another g; the same image, the same g.
  _, z_sem2, g2, _ = forward(params, jnp.flip(setup.x0, axis=0))
  assert not np.allclose(z_sem, z_sem2) and not np.allclose(g, g2)
  np.testing.assert_array_equal(g, forward(params, setup.x0)[2])
  # 'x_shift': the raw output is the x shift, O(1) at every noise level although g = shift / 2.2e4 at lambda = -20.
  shift = np.abs(shifted.x - pred.x).reshape(3, -1).max(axis=1)
  assert np.all(shift > 1e-2) and np.all(shift < 10.0)
  coef = np.asarray(sg.shift_coefficient(setup.logsnr))
  np.testing.assert_allclose(shift, np.abs(g).reshape(3, -1).max(axis=1) * coef, rtol=1e-4)


def test_score_parameterisation_outputs_g_itself():
  setup = _setup()
  params = {**setup.semantic_params, 'predictor': _perturb_conv_out(setup.semantic_params['predictor'])}
  g_shift = _forward(setup)(params, setup.x0)[2]
  g_score = _forward(_setup(gradient_param='score'))(params, setup.x0)[2]
  coef = sg.shift_coefficient(setup.logsnr)[:, None, None, None]
  np.testing.assert_allclose(g_shift * coef, g_score, rtol=1e-5, atol=1e-6)


def test_warm_start_from_student_copies_decoder_weights_but_not_the_output():
  setup = _setup()
  warm = semantic.warm_start_from_student(setup.semantic_params['predictor'], setup.student_params)
  decoder = setup.student_params['decoder']
  np.testing.assert_array_equal(warm['dec4_0']['conv1']['kernel'], decoder['dec4_0']['conv1']['kernel'])
  np.testing.assert_array_equal(warm['mid_attn']['q']['kernel'], decoder['mid_attn']['q']['kernel'])
  assert not np.any(warm['conv_out']['kernel'])
  for name in ('z_embed',):
    np.testing.assert_array_equal(warm[name]['kernel'], setup.semantic_params['predictor'][name]['kernel'])
  np.testing.assert_array_equal(warm['mid_0']['zemb_proj']['kernel'],
                                setup.semantic_params['predictor']['mid_0']['zemb_proj']['kernel'])


def test_shift_decoder_mirrors_the_students_decoder():
  """Warm-started, with the z modulation zeroed and the student's output conv, G_tau's decoder is the student's
  decoder exactly: same blocks, skips in the same order, the same time-embedding modulation."""
  setup = _setup(gradient_param='score')  # raw output = g, no 1/(sigma^2/alpha) rescaling
  warm = semantic.warm_start_from_student(setup.semantic_params['predictor'], setup.student_params)
  warm = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if 'zemb_proj' in jax.tree_util.keystr(path) else v, warm)
  warm = dict(warm, conv_out=setup.student_params['decoder']['conv_out'])
  features = setup.student.apply({'params': setup.student_params}, setup.z, setup.logsnr, train=False,
                                 method=unet.UNet.encode)
  student_out = _jit(lambda: setup.student.apply({'params': setup.student_params}, setup.z, setup.logsnr,
                                                 train=False))()
  g = _jit(lambda: sg.predict_gradient(setup.predictor, warm, z=setup.z, logsnr=setup.logsnr,
                                       z_sem=jnp.ones((setup.z.shape[0], 6)), features=features,
                                       gradient_param='score'))()
  assert float(jnp.abs(student_out).max()) > 0.1
  np.testing.assert_allclose(g, student_out, atol=1e-5)


def test_shift_predictor_needs_features():
  setup = _setup()
  with pytest.raises(ValueError, match='features'):
    sg.predict_gradient(setup.predictor, setup.semantic_params['predictor'], z=setup.z, logsnr=setup.logsnr,
                        z_sem=jnp.zeros((3, 6)), gradient_param='x_shift')


# The 'separate' form.


def test_separate_form_shapes_zero_init_and_dependence_on_z_sem():
  model_config = _model_config(channels=1)
  encoder, predictor = semantic.make_semantic_models(model_config, _semantic_config(form='separate'))
  assert isinstance(predictor, semantic.SeparateGradientNet) and predictor.ch == 8
  params = _jit(functools.partial(semantic.init_semantic_params, encoder, predictor, model_config=model_config))(
      jax.random.key(0))
  assert 'block0' in params['predictor'] and not np.any(params['predictor']['conv_out']['kernel'])
  z = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  logsnr = jnp.array([-20.0, 2.0])

  @functools.partial(_jit, static_argnums=(0, 3))
  def grad_fn(predictor, predictor_params, z_sem, gradient_param='x_shift'):
    return sg.predict_gradient(predictor, predictor_params, z=z, logsnr=logsnr, z_sem=z_sem,
                               gradient_param=gradient_param)

  z_sem = jax.random.normal(jax.random.key(2), (2, 6))
  g = grad_fn(predictor, params['predictor'], z_sem)
  assert g.shape == z.shape and not np.any(g)
  # Random weights everywhere: at init the blocks' zero conv2 would also hide z_sem, not only conv_out.
  perturbed = _random_like(params['predictor'], 4, zero_out=False)
  g = grad_fn(predictor, perturbed, z_sem)
  assert np.all(np.abs(g).reshape(2, -1).max(axis=1) > 0)
  assert not np.allclose(g, grad_fn(predictor, perturbed, -z_sem))
  np.testing.assert_allclose(g * sg.shift_coefficient(logsnr)[:, None, None, None],
                             grad_fn(predictor, perturbed, z_sem, 'score'), rtol=1e-5, atol=1e-6)


# The shift maths.


@pytest.mark.parametrize('logsnr', [-20.0, -8.0, -1.5, 0.0, 3.0, 12.0, 20.0])
def test_shift_coefficient_and_shift_x_by_hand(logsnr):
  alpha2 = 1.0 / (1.0 + np.exp(-np.float64(logsnr)))
  sigma2 = 1.0 / (1.0 + np.exp(np.float64(logsnr)))
  coef = sigma2 / np.sqrt(alpha2)
  np.testing.assert_allclose(sg.shift_coefficient(jnp.float32(logsnr)), coef, rtol=2e-6)
  x_hat = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 2, 2, 3)
  g = np.cos(np.arange(24, dtype=np.float32)).reshape(2, 2, 2, 3) * 1e-3
  shifted = sg.shift_x(x_hat=jnp.asarray(x_hat), g=jnp.asarray(g), logsnr=jnp.full((2,), logsnr))
  np.testing.assert_allclose(shifted, x_hat + coef * g, rtol=2e-6, atol=1e-7)
  assert np.isfinite(sg.shift_coefficient(jnp.float32(-150.0)))


def test_shift_coefficient_landmarks():
  np.testing.assert_allclose(sg.shift_coefficient(jnp.array([-20.0, 0.0, 20.0])),
                             [np.exp(10.0), 0.5**0.5, np.exp(-20.0)], rtol=1e-5)


@pytest.mark.parametrize('output_type', ['x', 'v'])
def test_shifted_prediction_is_consistent(output_type):
  keys = jax.random.split(jax.random.key(0), 3)
  shape = (5, 4, 4, 2)
  logsnr = jnp.array([-20.0, -6.0, 0.0, 3.0, 8.0])
  z = jax.random.normal(keys[0], shape)
  pred = process.predict(output=jax.random.normal(keys[1], shape), z=z, logsnr=logsnr, output_type=output_type)
  g = 1e-2 * jax.random.normal(keys[2], shape)
  shifted = sg.shifted_prediction(pred=pred, g=g, z=z, logsnr=logsnr)
  np.testing.assert_array_equal(shifted.x, sg.shift_x(x_hat=pred.x, g=g, logsnr=logsnr))
  # eps and v are those re-derived from the shifted x at (z, logsnr)...
  rederived = process.from_x(x=shifted.x, z=z, logsnr=logsnr)
  np.testing.assert_allclose(shifted.eps, rederived.eps, rtol=1e-4, atol=2e-3)
  np.testing.assert_allclose(shifted.v, rederived.v, rtol=1e-4, atol=2e-3)
  # ... so z = alpha x' + sigma eps' and v' = alpha eps' - sigma x' still hold.
  np.testing.assert_allclose(process.diffuse(x=shifted.x, eps=shifted.eps, logsnr=logsnr), z, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(process.v_from_x_eps(x=shifted.x, eps=shifted.eps, logsnr=logsnr), shifted.v,
                             rtol=1e-4, atol=1e-3)
  unshifted = sg.shifted_prediction(pred=pred, g=jnp.zeros(shape), z=z, logsnr=logsnr)
  for a, b in zip(unshifted, pred):
    np.testing.assert_array_equal(a, b)


# The loss.


@pytest.mark.parametrize('loss_type', losses.LOSS_TYPES)
def test_semantic_loss_with_callables_reaches_zero_at_the_exact_shift(loss_type):
  """A linear 'predictor' whose g is exactly (x_tilde - x_student) / coefficient when its weight is 1."""
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (4, 4, 4, 1)
  logsnr = jnp.array([-20.0, -4.0, 0.0, 5.0])
  z = jax.random.normal(keys[0], shape)
  student_pred = process.from_x(x=jnp.tanh(jax.random.normal(keys[1], shape)), z=z, logsnr=logsnr)
  target = process.from_x(x=jnp.tanh(jax.random.normal(keys[2], shape)), z=z, logsnr=logsnr)
  x0 = jax.random.normal(keys[3], shape)
  wanted = (target.x - student_pred.x) / sg.shift_coefficient(logsnr)[:, None, None, None]

  def encode_fn(params, images):
    return params['w'] * jnp.ones((images.shape[0], 2))

  def gradient_fn(params, z_t, logsnr_t, z_sem):
    del z_t, logsnr_t
    return params['a'] * jnp.mean(z_sem, axis=1)[:, None, None, None] * wanted

  loss_fn = functools.partial(sg.semantic_loss, encode_fn=encode_fn, gradient_fn=gradient_fn,
                              student_pred=student_pred, x0=x0, z=z, logsnr=logsnr, target=target,
                              loss_type=loss_type)
  exact = {'encoder': {'w': 1.0}, 'predictor': {'a': 1.0}}
  loss, metrics = loss_fn(exact)
  assert float(loss) < 1e-5 * float(metrics['student_loss'])
  loss, metrics = loss_fn({'encoder': {'w': 1.0}, 'predictor': {'a': 0.0}})
  plain = losses.denoising_loss(pred=student_pred, x_target=target.x, eps_target=target.eps, logsnr=logsnr,
                                loss_type=loss_type).mean()
  assert float(loss) == float(metrics['student_loss']) == float(plain) and float(metrics['shift_rms']) == 0.0
  grads = jax.grad(lambda p: loss_fn(p)[0])({'encoder': {'w': 1.0}, 'predictor': {'a': 0.5}})
  assert float(grads['predictor']['a']) < 0.0 and float(grads['encoder']['w']) < 0.0  # towards a w = 1


def test_semantic_loss_trains_only_the_semantic_params():
  setup = _setup()

  @_jit
  def loss_and_grads(semantic_params, student_params):
    fn = functools.partial(sg.model_semantic_loss, encoder=setup.encoder, predictor=setup.predictor,
                           student=setup.student, output_type=setup.model_config.output_type, x0=setup.x0, z=setup.z,
                           logsnr=setup.logsnr, target=setup.target, gradient_param=setup.gradient_param)
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(semantic_params, student_params)

  # At initialisation (g = 0) the semantic loss is the plain student's distillation loss, exactly.
  (loss, metrics), (semantic_grads, student_grads) = loss_and_grads(setup.semantic_params, setup.student_params)
  out = _jit(lambda p: setup.student.apply({'params': p}, setup.z, setup.logsnr, train=False))(setup.student_params)
  pred = process.predict(output=out, z=setup.z, logsnr=setup.logsnr, output_type='v')
  plain = losses.denoising_loss(pred=pred, x_target=setup.target.x, eps_target=setup.target.eps, logsnr=setup.logsnr,
                                loss_type='snr_trunc').mean()
  assert float(loss) == float(metrics['student_loss']) and float(metrics['shift_rms']) == 0.0
  np.testing.assert_allclose(loss, plain, rtol=1e-5)
  assert not any(np.any(leaf) for leaf in jax.tree_util.tree_leaves(student_grads))
  # Only the zero conv gets a gradient at first: g, hence the loss, does not yet depend on anything before it.
  assert np.any(semantic_grads['predictor']['conv_out']['kernel'])
  assert not np.any(semantic_grads['encoder']['out']['kernel'])

  params = {**setup.semantic_params, 'predictor': _perturb_conv_out(setup.semantic_params['predictor'])}
  (loss, metrics), (semantic_grads, student_grads) = loss_and_grads(params, setup.student_params)
  assert np.isfinite(loss) and float(loss) != float(metrics['student_loss'])
  assert not any(np.any(leaf) for leaf in jax.tree_util.tree_leaves(student_grads))
  for half in ('encoder', 'predictor'):
    leaves = jax.tree_util.tree_leaves(semantic_grads[half])
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert sum(bool(np.any(leaf)) for leaf in leaves) > len(leaves) // 2, half
  assert np.any(semantic_grads['encoder']['conv0']['kernel'])


def test_shifted_sampler_with_zero_output_samples_like_the_student():
  setup = _setup()
  z_sem = jnp.zeros((3, 6))
  shifted_fn = sg.shifted_denoise_fn(
      student=setup.student, student_params=setup.student_params, output_type='v', predictor=setup.predictor,
      predictor_params=setup.semantic_params['predictor'], z_sem=z_sem, gradient_param='x_shift')

  def plain_fn(z, logsnr):
    return sg.frozen_student(setup.student, setup.student_params, z, logsnr, output_type='v')[0]

  @_jit
  def both(z_init):
    run = lambda fn: samplers.sample_loop(denoise_fn=fn, z_init=z_init, num_steps=2, rng=jax.random.key(0))
    return run(shifted_fn), run(plain_fn)

  shifted, plain = both(setup.eps)
  assert shifted.shape == setup.eps.shape and np.all(np.abs(shifted) <= 1.0)
  np.testing.assert_allclose(shifted, plain, atol=1e-6)


# Config.


def test_config_entry_point_reads_every_key_and_validates():
  config = _semantic_config()
  config.lock()
  encoder, predictor = semantic.make_semantic_models(_model_config(dtype='bfloat16'), config)
  assert (encoder.latent_dim, encoder.ch, encoder.image_size) == (6, 8, 8) and encoder.dtype == jnp.bfloat16
  assert isinstance(predictor, semantic.ShiftDecoder) and predictor.out_channels == 3
  assert predictor.ch_mult == (1, 2) and predictor.attn_resolutions == (4,) and predictor.resblock_resample
  assert set(semantic.SEMANTIC_MODEL_KEYS) | {'gradient_param'} == set(config.keys())
  assert set(semantic.SEMANTIC_MODEL_KEYS) == set(semantic.SEMANTIC_DEFAULTS)
  # 'both' students still get a g of the image's shape.
  _, predictor = semantic.make_semantic_models(_model_config(output_type='both'), config)
  assert predictor.out_channels == 3
  # The settings semantic_predictor reads may be missing from exports older than them: what those did applies.
  assert sg.setting(semantic.SEMANTIC_DEFAULTS, 'gradient_param') == 'x_shift'
  assert sg.setting(semantic.SEMANTIC_DEFAULTS, 'target') == 'pd'
  for overrides, message in [(dict(gradient_param='eps'), 'gradient_param'), (dict(target='x1'), 'target'),
                             (dict(stop_fraction=1.0), 'stop_fraction')]:
    with pytest.raises(ValueError, match=message):
      sg.validate_config(_semantic_config(**overrides))
  for overrides, message in [(dict(form='both'), 'semantic.form'),
                             (dict(encoder_ch=6), 'encoder_ch'), (dict(separate_ch=0), 'separate_ch'),
                             (dict(latent_dim=0), 'latent_dim')]:
    with pytest.raises(ValueError, match=message):
      semantic.make_semantic_models(_model_config(), _semantic_config(**overrides))
  with pytest.raises(ValueError, match=r"lacks \['encoder_ch'\]"):
    semantic.make_semantic_models(_model_config(), {k: v for k, v in semantic.SEMANTIC_DEFAULTS.items()
                                                    if k != 'encoder_ch'})
