"""The semantic predictor's targets, code sensitivity and PDAE's switch-off (sferd/semantic_predictor.py)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sferd_jax.config import training_config
from sferd_jax.diffusion import distillation
from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules
from sferd_jax.models import semantic
from sferd_jax.models import unet
from sferd_jax.sferd import semantic_predictor as sp
from sferd_jax.training import state as state_lib
from sferd_jax.training import steps as steps_lib

LOGSNR_FN = schedules.cosine_logsnr


def _linear_teacher(z, logsnr):
  """E[x | z] for data of unit variance per pixel: x = alpha z. A teacher whose output depends on z alone."""
  alpha, _ = process.coefficients(logsnr, z)
  return process.from_x(x=alpha * z, z=z, logsnr=logsnr)


def _batch(seed=0, shape=(4, 8, 8, 1)):
  keys = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.uniform(keys[0], shape, minval=-1.0, maxval=1.0)
  eps = jax.random.normal(keys[1], shape)
  i = jax.random.randint(keys[2], (shape[0],), 0, 4)
  return x0, eps, i


# Targets, by hand.


def test_x0_target_is_the_image_and_its_eps_the_true_noise():
  x0, eps, i = _batch()
  logsnr = distillation.student_noise_level(i=i, num_steps=4, logsnr_fn=LOGSNR_FN)
  z = process.diffuse(x=x0, eps=eps, logsnr=logsnr)
  target = sp.semantic_target('x0', teacher=None, x0=x0, eps=eps, z=z, i=i, num_steps=4, logsnr_fn=LOGSNR_FN)
  np.testing.assert_array_equal(target.x, x0)
  np.testing.assert_allclose(target.eps, eps, atol=2e-4)


def test_teacher_on_data_target_renoises_the_data_at_the_midpoint():
  x0, eps, i = _batch()
  n = 4
  logsnr = distillation.student_noise_level(i=i, num_steps=n, logsnr_fn=LOGSNR_FN)
  z = process.diffuse(x=x0, eps=eps, logsnr=logsnr)
  calls = []

  def teacher(z_s, logsnr_s):
    calls.append(None)
    return _linear_teacher(z_s, logsnr_s)

  target = sp.semantic_target('teacher_on_data', teacher=teacher, x0=x0, eps=eps, z=z, i=i, num_steps=n,
                              logsnr_fn=LOGSNR_FN)
  assert len(calls) == 1  # one (guided) teacher call per example
  # By hand: s = (i + 1) / N - 1 / (2N), z_s = alpha_s x0 + sigma_s eps, x = alpha_s z_s.
  s = (np.asarray(i, np.float64) + 0.5) / n
  logsnr_s = np.asarray(LOGSNR_FN(jnp.asarray(s, jnp.float32)), np.float64)
  alpha_s = np.sqrt(1 / (1 + np.exp(-logsnr_s)))[:, None, None, None]
  sigma_s = np.sqrt(1 / (1 + np.exp(logsnr_s)))[:, None, None, None]
  expected = alpha_s * (alpha_s * np.asarray(x0) + sigma_s * np.asarray(eps))
  np.testing.assert_allclose(target.x, expected, atol=1e-5)
  # Consistent at the student's (z, logsnr): one DDIM step of it is well defined.
  np.testing.assert_allclose(process.diffuse(x=target.x, eps=target.eps, logsnr=logsnr), z, atol=1e-5)
  # It depends on x0 beyond z: another image with the same z gives another target.
  x1 = -x0
  eps1 = process.eps_from_x(z=z, x=x1, logsnr=logsnr)
  other = sp.semantic_target('teacher_on_data', teacher=_linear_teacher, x0=x1, eps=eps1, z=z, i=i, num_steps=n,
                             logsnr_fn=LOGSNR_FN)
  assert float(jnp.abs(other.x - target.x).mean()) > 0.05


def test_pd_target_is_progressive_distillations():
  x0, eps, i = _batch()
  logsnr = distillation.student_noise_level(i=i, num_steps=4, logsnr_fn=LOGSNR_FN)
  z = process.diffuse(x=x0, eps=eps, logsnr=logsnr)
  target = sp.semantic_target('pd', teacher=_linear_teacher, x0=x0, eps=eps, z=z, i=i, num_steps=4,
                              logsnr_fn=LOGSNR_FN)
  expected = distillation.student_target(teacher_fn=_linear_teacher, z=z, i=i, num_steps=4, logsnr_fn=LOGSNR_FN)
  for a, b in zip(target, expected):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='target must be one of'):
    sp.semantic_target('x1', teacher=_linear_teacher, x0=x0, eps=eps, z=z, i=i, num_steps=4, logsnr_fn=LOGSNR_FN)


# Code sensitivity.


def test_code_sensitivity_by_hand():
  plain = jnp.zeros((2, 1, 1, 1))
  shifted = jnp.array([1.0, 2.0, 4.0])[:, None, None, None, None] * jnp.array([1.0, -1.0])[None, :, None, None, None]
  out = sp.code_sensitivity(shifted, plain)
  # Pairs (1, 2), (1, 4), (2, 4): |differences| 1, 3, 2 at both inputs.
  np.testing.assert_allclose(out['code_sensitivity'], 2.0)
  np.testing.assert_allclose(out['shift_rms'], np.sqrt((1 + 4 + 16) / 3))
  same = sp.code_sensitivity(jnp.stack([plain + 0.5] * 3), plain)
  assert float(same['code_sensitivity']) == 0.0 and float(same['shift_rms']) == 0.5
  with pytest.raises(ValueError, match='at least 2 codes'):
    sp.code_sensitivity(shifted[:1], plain)


# PDAE's switch-off.


@pytest.mark.parametrize('num_steps, unshifted', [(1, 0), (2, 0), (3, 0), (4, 1), (7, 2), (10, 3), (16, 4)])
def test_shift_active_leaves_the_last_floor_03n_steps_unshifted(num_steps, unshifted):
  t = jnp.arange(num_steps, 0, -1, dtype=jnp.float32) / num_steps  # the sampler's step times, first to last
  logsnr = LOGSNR_FN(t)
  active = np.asarray(sp.shift_active(logsnr, num_steps=jnp.int32(num_steps), stop_fraction=0.3,
                                      logsnr_fn=LOGSNR_FN))
  np.testing.assert_array_equal(active, [True] * (num_steps - unshifted) + [False] * unshifted)
  assert np.all(sp.shift_active(logsnr, num_steps=num_steps, stop_fraction=0.0, logsnr_fn=LOGSNR_FN))


@functools.lru_cache(maxsize=None)  # compiling the inits costs more than the tests themselves
def _tiny_student_and_predictor(seed=0):
  model_config = ml_collections.ConfigDict(dict(
      image_size=8, channels=1, ch=8, emb_ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
      num_heads=1, head_dim=None, dropout=0.0, resblock_resample=False, num_classes=0, output_type='x',
      dtype='float32'))
  semantic_config = dict(latent_dim=4, encoder_ch=8, form='shift', separate_ch=8)
  student = unet.make_unet(model_config)
  encoder, predictor = semantic.make_semantic_models(model_config, semantic_config)
  keys = jax.random.split(jax.random.key(seed), 2)
  student_params = jax.jit(functools.partial(unet.init_params, student, model_config=model_config))(keys[0])
  params = jax.jit(functools.partial(semantic.init_semantic_params, encoder, predictor,
                                     model_config=model_config))(keys[1])
  # A nonzero output conv, so that the shift is not zero.
  conv_out = jax.tree.map(lambda v: 0.3 * jax.random.normal(jax.random.key(7), v.shape),
                          params['predictor']['conv_out'])
  params = dict(params, predictor=dict(params['predictor'], conv_out=conv_out))
  return model_config, student, student_params, encoder, predictor, params


def test_four_step_sampler_switches_the_shift_off_for_its_last_step_only():
  """stop_fraction 0.3 at N = 4: steps 1-3 shifted, step 4 the plain student's; the sampler agrees with a loop
  written out by hand, and differs from shifting every step."""
  _, student, student_params, _, predictor, params = _tiny_student_and_predictor()
  z_init = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  z_sem = jax.random.normal(jax.random.key(2), (2, 4))
  kwargs = dict(student=student, student_params=student_params, output_type='x', predictor=predictor,
                predictor_params=params['predictor'], z_sem=z_sem, gradient_param='x_shift')
  switched = sp.shifted_denoise_fn(num_steps=4, stop_fraction=0.3, logsnr_fn=LOGSNR_FN, **kwargs)
  always = sp.shifted_denoise_fn(**kwargs)
  plain = lambda z, logsnr: sp.frozen_student(student, student_params, z, logsnr, output_type='x')[0]

  @jax.jit
  def run():
    loop = lambda fn: samplers.sample_loop(denoise_fn=fn, z_init=z_init, num_steps=4, rng=jax.random.key(0))
    z = z_init
    for j in range(4):  # by hand: shifted, shifted, shifted, plain
      t, s = samplers.time_grid(3 - j, 4)
      logsnr_t, logsnr_s = jnp.full((2,), LOGSNR_FN(t)), jnp.full((2,), LOGSNR_FN(s))
      pred = process.clip_x((always if j < 3 else plain)(z, logsnr_t), z=z, logsnr=logsnr_t)
      z = pred.x if j == 3 else samplers.ddim_step(pred=pred, logsnr_s=logsnr_s)
    return loop(switched), z, loop(always)

  switched_x, by_hand, always_x = run()
  np.testing.assert_allclose(switched_x, by_hand, atol=1e-5)
  assert float(jnp.abs(switched_x - always_x).max()) > 1e-3
  with pytest.raises(ValueError, match='num_steps and logsnr_fn'):
    sp.shifted_denoise_fn(stop_fraction=0.3, **kwargs)


# Training: the target decides whether the code carries anything.


def _sensitivity_after_training(target, *, steps=200):
  """Trains E_phi and G_tau for `steps` updates on a frozen 1-step student, on two classes of images (+pattern,
  -pattern) whose noisy inputs at lambda = -20 are the same noise; returns the mean code sensitivity of the last
  20 updates and the trained state."""
  model_config, student, student_params, encoder, predictor, initial = _tiny_student_and_predictor()
  semantic_config = dict(latent_dim=4, encoder_ch=8, form='shift', separate_ch=8, target=target)
  train_config = training_config(train_steps=steps, batch_size=16, learning_rate=3e-3)
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, steps)
  step = steps_lib.make_semantic_step(
      student=student, encoder=encoder, predictor=predictor, model_config=model_config,
      semantic_config=semantic_config, diffusion_config=dict(logsnr_min=-20.0, logsnr_max=20.0),
      train_config=train_config, tx=tx, schedule=schedule,
      teacher_fn=lambda params, labels: _linear_teacher)
  # As initialised (the output conv zero, so the shift and the sensitivity start at exactly 0).
  params = dict(initial, predictor=dict(initial['predictor'], conv_out=jax.tree.map(
      jnp.zeros_like, initial['predictor']['conv_out'])))
  state = state_lib.TrainState.create(params=params, tx=tx, ema_decay=0.0)
  pattern = jnp.where(jnp.arange(8)[:, None] < 4, 0.8, -0.8) * jnp.ones((8, 8))
  images = jnp.stack([pattern, -pattern] * 8)[..., None]  # (16, 8, 8, 1): both classes in every batch
  batch = {'image': images, 'label': jnp.zeros((16,), jnp.int32)}
  jitted = jax.jit(step, compiler_options={'xla_backend_optimization_level': 0})  # compile time dominates
  sensitivity = []
  for _ in range(steps):
    state, metrics = jitted(state, batch, jax.random.key(0), student_params, {}, jnp.int32(1))
    sensitivity.append(float(metrics['code_sensitivity']))
  return np.mean(sensitivity[-20:]), state


def test_only_a_target_that_depends_on_x0_makes_the_predictor_use_its_code():
  pd, _ = _sensitivity_after_training('pd')
  on_data, _ = _sensitivity_after_training('teacher_on_data')
  x0, _ = _sensitivity_after_training('x0')
  assert pd < 0.01, pd
  assert on_data > 10 * max(pd, 1e-3) and x0 > 10 * max(pd, 1e-3), (pd, on_data, x0)
