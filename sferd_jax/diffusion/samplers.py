"""DDIM, ancestral and consistency samplers as one jitted fori_loop over a uniform time grid.

A `denoise_fn(z, logsnr) -> Prediction` stands for the model; the loop knows nothing else about it, so the same
loop samples a teacher, a distilled student, a guided teacher or a student with a semantic shift.
"""

import chex
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import process
from sferd_jax.diffusion import schedules

SAMPLERS = ('ddim', 'ancestral', 'consistency')


def ddim_step(*, pred, logsnr_s):
  """z_s = alpha_s x_hat + sigma_s eps_hat: the deterministic DDIM update (eta = 0)."""
  alpha_s, sigma_s = process.coefficients(logsnr_s, pred.x)
  return alpha_s * pred.x + sigma_s * pred.eps


def ancestral_step(*, pred, z_t, logsnr_t, logsnr_s, rng):
  """A draw from the posterior q(z_s | z_t, x = x_hat), with its own (smaller) variance."""
  chex.assert_equal_shape([pred.x, z_t])
  alpha_t, _ = process.coefficients(logsnr_t, z_t)
  alpha_s, sigma_s = process.coefficients(logsnr_s, z_t)
  # r = SNR_t / SNR_s < 1; the posterior mean mixes z_t and x_hat, its variance is (1 - r) sigma_s^2.
  r = process.expand(jnp.exp(logsnr_t - logsnr_s), z_t)
  one_minus_r = process.expand(-jnp.expm1(logsnr_t - logsnr_s), z_t)  # exact when the steps are small
  mean = r * (alpha_s / alpha_t) * z_t + one_minus_r * alpha_s * pred.x
  std = jnp.sqrt(one_minus_r) * sigma_s
  return mean + std * jax.random.normal(rng, z_t.shape, z_t.dtype)


def consistency_step(*, pred, logsnr_s, rng):
  """Multistep consistency sampling: the model's x at t, diffused afresh to s (new noise, not the model's eps)."""
  eps = jax.random.normal(rng, pred.x.shape, pred.x.dtype)
  return process.diffuse(x=pred.x, eps=eps, logsnr=logsnr_s)


def time_grid(i, num_steps):
  """Step i of num_steps (i = num_steps - 1 first) goes from t = (i + 1) / N to s = i / N."""
  n = jnp.asarray(num_steps, jnp.float32)
  i = jnp.asarray(i, jnp.float32)
  return (i + 1.0) / n, i / n


def sample_loop(*, denoise_fn, z_init, num_steps, rng, sampler='ddim', clip_x=True,
                logsnr_min=schedules.LOGSNR_MIN, logsnr_max=schedules.LOGSNR_MAX):
  """Runs num_steps denoising steps from z_init at t = 1 and returns x at t = 0.

  num_steps may be a traced int32: one compilation serves every step count. The last step returns x_hat
  itself (as progressive distillation does), so a 1-step sampler is one model evaluation. 'consistency' is the
  consistency models' multistep sampler: each step maps z_t to x and diffuses it to s with fresh noise.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler must be one of {SAMPLERS}, got {sampler!r}')
  batch = z_init.shape[0]

  def body(j, z_t):
    i = num_steps - 1 - j
    t, s = time_grid(i, num_steps)
    logsnr_t = jnp.full((batch,), schedules.cosine_logsnr(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max))
    logsnr_s = jnp.full((batch,), schedules.cosine_logsnr(s, logsnr_min=logsnr_min, logsnr_max=logsnr_max))
    pred = denoise_fn(z_t, logsnr_t)
    if clip_x:
      pred = process.clip_x(pred, z=z_t, logsnr=logsnr_t)
    if sampler == 'ddim':
      z_s = ddim_step(pred=pred, logsnr_s=logsnr_s)
    elif sampler == 'ancestral':
      z_s = ancestral_step(pred=pred, z_t=z_t, logsnr_t=logsnr_t, logsnr_s=logsnr_s,
                           rng=jax.random.fold_in(rng, i))
    else:
      z_s = consistency_step(pred=pred, logsnr_s=logsnr_s, rng=jax.random.fold_in(rng, i))
    return jnp.where(i == 0, pred.x, z_s)

  return jax.lax.fori_loop(0, num_steps, body, z_init)
