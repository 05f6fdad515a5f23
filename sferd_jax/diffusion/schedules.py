"""Noise schedules in log-SNR form (continuous time, variance preserving).

Every quantity of the forward process derives from lambda = log(alpha^2 / sigma^2):
alpha^2 = sigmoid(lambda) and sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1.
"""

import jax.numpy as jnp

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def cosine_logsnr(t, *, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
  """lambda(t) = -2 log tan(a t + b): lambda(0) = logsnr_max, lambda(1) = logsnr_min."""
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
  return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))


def alpha_sigma(logsnr):
  """(alpha, sigma) of z = alpha x + sigma eps at this log-SNR."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jnp.exp(-jnp.logaddexp(0.0, -logsnr))), jnp.sqrt(jnp.exp(-jnp.logaddexp(0.0, logsnr)))
