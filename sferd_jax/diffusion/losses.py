"""Per-example training losses of a denoiser against (x, eps) targets."""

import chex
import jax.numpy as jnp

from sferd_jax.diffusion import process

LOSS_TYPES = ('snr_trunc', 'v_mse', 'eps_mse')


def _mean_per_example(a):
  return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def denoising_loss(*, pred, x_target, eps_target, logsnr, loss_type):
  """(B,) losses. snr_trunc = max(|x_hat - x|^2, |eps_hat - eps|^2), i.e. x-MSE weighted by max(SNR, 1)."""
  chex.assert_equal_shape([pred.x, x_target, eps_target])
  if loss_type == 'snr_trunc':
    return jnp.maximum(_mean_per_example((pred.x - x_target)**2), _mean_per_example((pred.eps - eps_target)**2))
  if loss_type == 'v_mse':
    v_target = process.v_from_x_eps(x=x_target, eps=eps_target, logsnr=logsnr)
    return _mean_per_example((pred.v - v_target)**2)
  if loss_type == 'eps_mse':
    return _mean_per_example((pred.eps - eps_target)**2)
  raise ValueError(f'loss_type must be one of {LOSS_TYPES}, got {loss_type!r}')
