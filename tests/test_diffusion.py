"""Closed-form identities of the diffusion maths (issue: core) and of the distillation target (issue: PD)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sferd_jax.diffusion import distillation
from sferd_jax.diffusion import losses
from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules

SHAPE = (3, 4, 4, 2)


def _x(seed=0):
  return jax.random.uniform(jax.random.key(seed), SHAPE, minval=-1.0, maxval=1.0)


def _eps(seed=1):
  return jax.random.normal(jax.random.key(seed), SHAPE)


LOGSNR = jnp.array([-6.0, 0.5, 7.0])


def test_cosine_schedule_end_points_monotone_and_inverse():
  np.testing.assert_allclose(schedules.cosine_logsnr(0.0), 20.0, atol=1e-3)
  np.testing.assert_allclose(schedules.cosine_logsnr(1.0), -20.0, atol=1e-2)
  np.testing.assert_allclose(schedules.cosine_logsnr(0.5), 0.0, atol=1e-5)
  np.testing.assert_allclose(schedules.cosine_logsnr(jnp.array([0.0, 1.0]), logsnr_min=-5.0, logsnr_max=3.0),
                             [3.0, -5.0], atol=1e-4)
  # lambda(t) = -2 log tan(a t + b) at an inner point, by hand.
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  np.testing.assert_allclose(schedules.cosine_logsnr(0.3), -2 * np.log(np.tan(a * 0.3 + b)), rtol=1e-5)
  assert jnp.all(jnp.diff(schedules.cosine_logsnr(jnp.linspace(0.0, 1.0, 101))) < 0)


def test_alpha_sigma_variance_preserving():
  alpha, sigma = schedules.alpha_sigma(jnp.linspace(-20.0, 20.0, 41))
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2), jnp.linspace(-20.0, 20.0, 41), atol=1e-3)


@pytest.mark.parametrize('output_type', ['x', 'eps', 'v', 'both'])
def test_predictions_stay_finite_and_accurate_at_the_schedule_ends(output_type):
  """float32 at log-SNR -20 (alpha = 4.5e-5) and +20 (sigma = 4.5e-5): every output type gives finite x and eps,
  with the error the conversions' conditioning allows (dividing by the small coefficient)."""
  logsnr = jnp.array([-20.0, -20.0, 20.0])
  x, eps = _x(), _eps()
  z = process.diffuse(x=x, eps=eps, logsnr=logsnr)
  v = process.v_from_x_eps(x=x, eps=eps, logsnr=logsnr)
  output = {'x': x, 'eps': eps, 'v': v, 'both': jnp.concatenate([x, eps], -1)}[output_type]
  pred = process.predict(output=output, z=z, logsnr=logsnr, output_type=output_type)
  assert all(np.all(np.isfinite(a)) for a in pred)
  x_err = np.abs(np.asarray(pred.x - x)).max(axis=(1, 2, 3))
  eps_err = np.abs(np.asarray(pred.eps - eps)).max(axis=(1, 2, 3))
  # x from eps at alpha ~ 5e-5 and eps from x at sigma ~ 5e-5 lose ~1e-2 to float32 cancellation; the rest is exact.
  assert x_err[:2].max() < (3e-2 if output_type == 'eps' else 1e-5), x_err
  assert eps_err[2] < (3e-2 if output_type in ('x', 'both') else 1e-5), eps_err


def test_x_eps_v_round_trips():
  x, eps = _x(), _eps()
  z = process.diffuse(x=x, eps=eps, logsnr=LOGSNR)
  v = process.v_from_x_eps(x=x, eps=eps, logsnr=LOGSNR)
  np.testing.assert_allclose(process.x_from_eps(z=z, eps=eps, logsnr=LOGSNR), x, atol=2e-4)
  np.testing.assert_allclose(process.eps_from_x(z=z, x=x, logsnr=LOGSNR), eps, atol=2e-4)
  np.testing.assert_allclose(process.x_from_v(z=z, v=v, logsnr=LOGSNR), x, atol=1e-5)
  np.testing.assert_allclose(process.eps_from_v(z=z, v=v, logsnr=LOGSNR), eps, atol=1e-5)


@pytest.mark.parametrize('output_type', ['x', 'eps', 'v'])
def test_predict_recovers_truth_for_each_output_type(output_type):
  x, eps = _x(), _eps()
  z = process.diffuse(x=x, eps=eps, logsnr=LOGSNR)
  output = {'x': x, 'eps': eps, 'v': process.v_from_x_eps(x=x, eps=eps, logsnr=LOGSNR)}[output_type]
  pred = process.predict(output=output, z=z, logsnr=LOGSNR, output_type=output_type)
  np.testing.assert_allclose(pred.x, x, atol=2e-4)
  np.testing.assert_allclose(pred.eps, eps, atol=2e-4)


def test_predict_both_mixes_heads_by_noise_level():
  x, eps = _x(), _eps()
  z = process.diffuse(x=x, eps=eps, logsnr=LOGSNR)
  x_head, eps_head = _x(5), _eps(6)  # two disagreeing heads
  pred = process.predict(output=jnp.concatenate([x_head, eps_head], -1), z=z, logsnr=LOGSNR, output_type='both')
  alpha, sigma = schedules.alpha_sigma(LOGSNR)
  a, s = alpha[:, None, None, None], sigma[:, None, None, None]
  np.testing.assert_allclose(pred.x, s**2 * x_head + a**2 * (z - s * eps_head) / a, atol=1e-5)
  # Both heads right -> the truth.
  pred = process.predict(output=jnp.concatenate([x, eps], -1), z=z, logsnr=LOGSNR, output_type='both')
  np.testing.assert_allclose(pred.x, x, atol=1e-4)
  with pytest.raises(ValueError, match='output_type'):
    process.predict(output=x, z=z, logsnr=LOGSNR, output_type='score')


def test_clip_x_keeps_prediction_consistent():
  z = 3.0 * _eps()
  pred = process.clip_x(process.from_x(x=2.0 * _x(), z=z, logsnr=LOGSNR), z=z, logsnr=LOGSNR)
  assert float(jnp.max(jnp.abs(pred.x))) <= 1.0
  np.testing.assert_allclose(process.diffuse(x=pred.x, eps=pred.eps, logsnr=LOGSNR), z, atol=1e-4)


@pytest.mark.parametrize('sampler', samplers.SAMPLERS)
def test_sample_loop_fed_the_true_x_recovers_x_exactly(sampler):
  x = _x()
  oracle = lambda z, logsnr: process.from_x(x=x, z=z, logsnr=logsnr)
  for num_steps in (1, 2, 7):
    out = samplers.sample_loop(denoise_fn=oracle, z_init=_eps(), num_steps=num_steps, rng=jax.random.key(0),
                               sampler=sampler)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize('num_steps', [1, 3])
def test_ddim_loop_equals_a_hand_written_loop(num_steps):
  """A denoiser that depends on z and the noise level, so every step's time and update matter."""
  def denoise(z, logsnr):
    return process.from_x(x=jnp.tanh(0.7 * z + 0.1 * logsnr[:, None, None, None]), z=z, logsnr=logsnr)

  z = _eps()
  out = samplers.sample_loop(denoise_fn=denoise, z_init=z, num_steps=num_steps, rng=jax.random.key(0))
  expected = np.asarray(z, np.float64)
  lam = lambda t: float(schedules.cosine_logsnr(t))
  sig = lambda l: 1.0 / (1.0 + np.exp(-l))
  for i in reversed(range(num_steps)):  # t = (i + 1) / N -> s = i / N
    lt, ls = lam((i + 1) / num_steps), lam(i / num_steps)
    a_t, s_t, a_s, s_s = np.sqrt(sig(lt)), np.sqrt(sig(-lt)), np.sqrt(sig(ls)), np.sqrt(sig(-ls))
    x_hat = np.clip(np.tanh(0.7 * expected + 0.1 * lt), -1, 1)
    eps_hat = (expected - a_t * x_hat) / s_t
    expected = x_hat if i == 0 else a_s * x_hat + s_s * eps_hat
  np.testing.assert_allclose(out, expected, atol=2e-5)


def test_ancestral_step_preserves_the_forward_marginal():
  """With the true x, z_t ~ q(z_t | x) stepped by the posterior is distributed as q(z_s | x) = N(alpha_s x,
  sigma_s^2)."""
  n = 20000
  x = jnp.full((n, 1, 1, 1), 0.4)
  lt, ls = jnp.full((n,), -0.5), jnp.full((n,), 2.0)
  z_t = process.diffuse(x=x, eps=jax.random.normal(jax.random.key(5), x.shape), logsnr=lt)
  z_s = samplers.ancestral_step(pred=process.from_x(x=x, z=z_t, logsnr=lt), z_t=z_t, logsnr_t=lt, logsnr_s=ls,
                                rng=jax.random.key(6))
  alpha_s, sigma_s = schedules.alpha_sigma(2.0)
  np.testing.assert_allclose(jnp.mean(z_s), alpha_s * 0.4, atol=0.01)
  np.testing.assert_allclose(jnp.std(z_s), sigma_s, rtol=0.02)


def test_sample_loop_compiles_once_for_every_step_count():
  traces = []

  def denoise(z, logsnr):
    traces.append(1)
    return process.from_x(x=jnp.tanh(z), z=z, logsnr=logsnr)

  run = jax.jit(lambda z, n: samplers.sample_loop(denoise_fn=denoise, z_init=z, num_steps=n, rng=jax.random.key(0)))
  outs = [run(_eps(), jnp.int32(n)) for n in (1, 2, 4)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[2])


def test_ancestral_step_moments():
  """Many draws of the posterior step have the closed-form mean and variance of q(z_s | z_t, x)."""
  x = jnp.full((4000, 1, 1, 1), 0.3)
  z_t = jnp.full_like(x, -0.2)
  lt, ls = jnp.full((4000,), -1.0), jnp.full((4000,), 1.5)
  pred = process.from_x(x=x, z=z_t, logsnr=lt)
  z_s = samplers.ancestral_step(pred=pred, z_t=z_t, logsnr_t=lt, logsnr_s=ls, rng=jax.random.key(3))
  (at, _), (as_, ss) = schedules.alpha_sigma(-1.0), schedules.alpha_sigma(1.5)
  r = np.exp(-1.0 - 1.5)
  np.testing.assert_allclose(jnp.mean(z_s), r * as_ / at * -0.2 + (1 - r) * as_ * 0.3, atol=0.02)
  np.testing.assert_allclose(jnp.var(z_s), (1 - r) * ss**2, rtol=0.08)


def test_losses_against_hand_computation():
  x, eps = _x(), _eps()
  z = process.diffuse(x=x, eps=eps, logsnr=LOGSNR)
  pred = process.from_x(x=x + 0.1, z=z, logsnr=LOGSNR)
  x_mse = jnp.mean((pred.x - x)**2, axis=(1, 2, 3))
  eps_mse = jnp.mean((pred.eps - eps)**2, axis=(1, 2, 3))
  kw = dict(pred=pred, x_target=x, eps_target=eps, logsnr=LOGSNR)
  np.testing.assert_allclose(losses.denoising_loss(loss_type='snr_trunc', **kw), jnp.maximum(x_mse, eps_mse),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.denoising_loss(loss_type='eps_mse', **kw), eps_mse, rtol=1e-6)
  # snr_trunc = x_mse * max(SNR, 1): eps_mse = SNR * x_mse for an x error at fixed z.
  np.testing.assert_allclose(eps_mse, jnp.exp(LOGSNR) * x_mse, rtol=1e-3)
  # At fixed z an x error d is a v error -d / sigma: v_mse = x_mse * (1 + SNR).
  v_mse = losses.denoising_loss(loss_type='v_mse', **kw)
  np.testing.assert_allclose(v_mse, (1 + jnp.exp(LOGSNR)) * x_mse, rtol=1e-3)
  perfect = process.from_x(x=x, z=z, logsnr=LOGSNR)
  for loss_type in losses.LOSS_TYPES:
    assert float(jnp.max(losses.denoising_loss(loss_type=loss_type, **dict(kw, pred=perfect)))) < 1e-6
  with pytest.raises(ValueError, match='loss_type'):
    losses.denoising_loss(loss_type='l1', **kw)


# Progressive distillation.

def _toy_teacher(scale=0.7):
  """A nonlinear teacher: x_hat = tanh(scale * z) (different at every noise level through eps)."""
  return lambda z, logsnr: process.from_x(x=jnp.tanh(scale * z + 0.1 * logsnr[:, None, None, None]), z=z,
                                          logsnr=logsnr)


def _logsnr_fn(u):
  return schedules.cosine_logsnr(u)


@pytest.mark.parametrize('num_steps', [2, 4, 64])
def test_student_step_with_x_target_lands_on_teacher_two_steps(num_steps):
  teacher = _toy_teacher()
  i = jnp.array([1, num_steps // 2, num_steps - 1])
  u = (i + 1.0) / num_steps
  logsnr_t, logsnr_s = _logsnr_fn(u), _logsnr_fn(u - 1.0 / num_steps)
  z = process.diffuse(x=_x(), eps=_eps(), logsnr=logsnr_t)
  target = distillation.student_target(teacher_fn=teacher, z=z, i=i, num_steps=num_steps, logsnr_fn=_logsnr_fn)
  z_teacher, _ = distillation.teacher_two_steps(teacher_fn=teacher, z=z, logsnr_t=logsnr_t,
                                                logsnr_mid=_logsnr_fn(u - 0.5 / num_steps), logsnr_s=logsnr_s)
  z_student = samplers.ddim_step(pred=target, logsnr_s=logsnr_s)
  np.testing.assert_allclose(z_student, z_teacher, atol=2e-4)
  assert not np.allclose(target.x, teacher(z, logsnr_t).x, atol=1e-2)  # the target is not the teacher's x


def test_student_target_at_the_last_step_is_the_teachers_last_x():
  teacher = _toy_teacher()
  num_steps = 4
  i = jnp.zeros((3,), jnp.int32)
  logsnr_t, logsnr_mid = _logsnr_fn(jnp.full((3,), 0.25)), _logsnr_fn(jnp.full((3,), 0.125))
  z = process.diffuse(x=_x(), eps=_eps(), logsnr=logsnr_t)
  target = distillation.student_target(teacher_fn=teacher, z=z, i=i, num_steps=num_steps, logsnr_fn=_logsnr_fn)
  z_mid = samplers.ddim_step(pred=teacher(z, logsnr_t), logsnr_s=logsnr_mid)
  np.testing.assert_allclose(target.x, teacher(z_mid, logsnr_mid).x, atol=1e-6)
  np.testing.assert_allclose(process.diffuse(x=target.x, eps=target.eps, logsnr=logsnr_t), z, atol=1e-4)


def test_teacher_that_knows_x_gives_target_x():
  x = _x()
  oracle = lambda z, logsnr: process.from_x(x=x, z=z, logsnr=logsnr)
  for num_steps in (1, 2, 8):
    i = jnp.array([0, num_steps // 2, num_steps - 1])
    z = process.diffuse(x=x, eps=_eps(), logsnr=distillation.student_noise_level(i=i, num_steps=num_steps,
                                                                                 logsnr_fn=_logsnr_fn))
    target = distillation.student_target(teacher_fn=oracle, z=z, i=i, num_steps=num_steps, logsnr_fn=_logsnr_fn)
    np.testing.assert_allclose(target.x, x, atol=2e-3)


def test_student_target_with_traced_num_steps_compiles_once():
  traces = []

  @jax.jit
  def target(z, i, n):
    traces.append(1)
    return distillation.student_target(teacher_fn=_toy_teacher(), z=z, i=i, num_steps=n, logsnr_fn=_logsnr_fn).x

  a = target(_eps(), jnp.array([0, 1, 1]), jnp.int32(2))
  b = target(_eps(), jnp.array([0, 1, 3]), jnp.int32(4))
  assert len(traces) == 1 and not np.allclose(a, b)
