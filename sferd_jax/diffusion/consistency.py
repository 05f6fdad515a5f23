"""Consistency distillation (Song et al. 2023, "Consistency Models") in the project's continuous log-SNR maths.

A consistency model f(z_t, lambda_t) maps every point of a probability-flow ODE trajectory to the trajectory's
data end. It is a U-Net whose x prediction is mixed with z / alpha so that f(z, lambda_max) = z / alpha exactly
(process.consistency_output; output type 'consistency_<head>'). One training step, on the uniform time grid
t_n = n / N of the cosine schedule (the samplers' grid):
  n ~ U{0..N-1}, z_{n+1} = alpha_{n+1} x + sigma_{n+1} eps,
  z_n = the teacher's one ODE step from t_{n+1} to t_n (ode_step: DDIM, or Heun),
  loss = d(f_theta(z_{n+1}, lambda_{n+1}), f_theta-(z_n, lambda_n)), theta- = stopgrad EMA of theta (decay mu).
At n = 0, t_0 = 0 is lambda_max, where f_theta- is the identity: the chain is anchored at the data.
Differences from the paper, each a consequence of the schedule: the grid is uniform in t over the cosine log-SNR
schedule (the paper: Karras' rho = 7 grid in sigma), and Heun runs in the variables where DDIM is Euler (ode_step).
"""

import chex
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers

SOLVERS = ('ddim', 'heun')
DISTANCES = ('pseudo_huber', 'l2')


def ode_step(*, teacher_fn, z, logsnr_t, logsnr_s, solver='ddim'):
  """The teacher's probability-flow ODE step from lambda_t to lambda_s (B,): z_s.

  Written in w = z / sigma and r = alpha / sigma, the ODE is dw/dr = x_hat(z, lambda), and DDIM is exactly its Euler
  step. 'heun' is Heun's method in the same variables: w_s = w_t + (r_s - r_t) (x_t + x')/2, x' the teacher at
  the Euler point; that is a DDIM step from z_t with the averaged x. (Heun in EDM's variables z / alpha and
  sigma / alpha weighs the teacher at the end of a step by half: from lambda = -20, where sigma / alpha = 2.2e4,
  that is ~10^3 times what the exact solution gives it.) teacher_fn(z, logsnr) -> Prediction; 'heun' calls it twice.
  """
  chex.assert_equal_shape([logsnr_t, logsnr_s])
  pred = teacher_fn(z, logsnr_t)
  z_euler = samplers.ddim_step(pred=pred, logsnr_s=logsnr_s)
  if solver == 'ddim':
    return z_euler
  if solver != 'heun':
    raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}')
  x_mean = 0.5 * (pred.x + teacher_fn(z_euler, logsnr_s).x)
  return samplers.ddim_step(pred=process.from_x(x=x_mean, z=z, logsnr=logsnr_t), logsnr_s=logsnr_s)


def distance(a, b, *, kind='pseudo_huber'):
  """(B,) distances between two batches of images.

  pseudo_huber (improved consistency training's): sqrt(|a - b|^2 + c^2) - c with c = 0.00054 sqrt(d), d the pixels
  per image: quadratic for small errors, linear for large ones. It stands in for LPIPS, whose weights need a
  download. l2: the mean squared error.
  """
  chex.assert_equal_shape([a, b])
  axes = tuple(range(1, a.ndim))
  squared = jnp.sum((a - b)**2, axis=axes)
  if kind == 'l2':
    return squared / (a.size // a.shape[0])
  if kind != 'pseudo_huber':
    raise ValueError(f'distance must be one of {DISTANCES}, got {kind!r}')
  c = 0.00054 * jnp.sqrt(float(a.size // a.shape[0]))
  return jnp.sqrt(squared + c**2) - c


def num_scales(step, *, start, end, total_steps):
  """N(k), the ODE grid's intervals at training step k: the consistency models' schedule
  ceil(sqrt(k / K ((end + 1)^2 - start^2) + start^2) - 1) + 1, constant when start == end (their CD: N = 18).
  step may be traced."""
  if start == end:
    return jnp.int32(start)
  k = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
  n = jnp.ceil(jnp.sqrt(k * ((end + 1.0)**2 - start**2) + start**2) - 1.0) + 1
  return jnp.clip(n, min(start, end), max(start, end)).astype(jnp.int32)


def grid_levels(n, num, *, logsnr_fn):
  """(lambda at t_{n+1}, lambda at t_n) of the grid t_k = k / num, for n (B,) int in [0, num); num may be traced."""
  num = jnp.asarray(num, jnp.float32)
  n = n.astype(jnp.float32)
  return logsnr_fn((n + 1.0) / num), logsnr_fn(n / num)


def update_target(target, params, *, decay):
  """theta- <- decay theta- + (1 - decay) theta, after each optimizer step (decay 0: theta- is theta)."""
  return jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p, target, params)
