"""The forward process q(z_t | x) and conversions between x, eps and v predictions.

Images are NHWC float32 in [-1, 1]; log-SNR has shape (B,) and broadcasts over the image axes.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import schedules

OUTPUT_TYPES = ('x', 'eps', 'v', 'both')
# A consistency model (diffusion/consistency.py) is a U-Net with one of those heads whose x prediction is then mixed
# with z / alpha to meet the boundary condition: output type 'consistency_<head>', e.g. 'consistency_x'.
CONSISTENCY = 'consistency_'
# The data's standard deviation in the boundary mix, the consistency models' (and EDM's) value for images in [-1, 1].
SIGMA_DATA = 0.5


class Prediction(NamedTuple):
  """A denoiser's output, in all three parameterisations."""
  x: jnp.ndarray
  eps: jnp.ndarray
  v: jnp.ndarray


def expand(values, like):
  """Per-example values (B,) reshaped to broadcast over `like`'s other axes: (B, 1, ..., 1)."""
  chex.assert_rank(values, 1)
  chex.assert_axis_dimension(like, 0, values.shape[0])
  return values.reshape((-1,) + (1,) * (like.ndim - 1))


def coefficients(logsnr, like):
  """alpha, sigma at per-example log-SNRs (B,), shaped to broadcast over `like` (B, ...)."""
  alpha, sigma = schedules.alpha_sigma(logsnr)
  return expand(alpha, like), expand(sigma, like)


def diffuse(*, x, eps, logsnr):
  """z_t = alpha x + sigma eps."""
  chex.assert_equal_shape([x, eps])
  alpha, sigma = coefficients(logsnr, x)
  return alpha * x + sigma * eps


def x_from_eps(*, z, eps, logsnr):
  chex.assert_equal_shape([z, eps])
  alpha, sigma = coefficients(logsnr, z)
  return (z - sigma * eps) / alpha


def eps_from_x(*, z, x, logsnr):
  chex.assert_equal_shape([z, x])
  alpha, sigma = coefficients(logsnr, z)
  return (z - alpha * x) / sigma


def v_from_x_eps(*, x, eps, logsnr):
  """v = alpha eps - sigma x."""
  chex.assert_equal_shape([x, eps])
  alpha, sigma = coefficients(logsnr, x)
  return alpha * eps - sigma * x


def x_from_v(*, z, v, logsnr):
  """x = alpha z - sigma v."""
  chex.assert_equal_shape([z, v])
  alpha, sigma = coefficients(logsnr, z)
  return alpha * z - sigma * v


def eps_from_v(*, z, v, logsnr):
  """eps = sigma z + alpha v."""
  chex.assert_equal_shape([z, v])
  alpha, sigma = coefficients(logsnr, z)
  return sigma * z + alpha * v


def head_type(output_type):
  """The U-Net head behind an output type: 'consistency_both' -> 'both'; a plain type is its own head."""
  return output_type[len(CONSISTENCY):] if output_type.startswith(CONSISTENCY) else output_type


def is_consistency(output_type):
  return output_type.startswith(CONSISTENCY)


def skip_coefficient(logsnr, *, sigma_data=SIGMA_DATA):
  """c_skip = sigma_d^2 / (sigma_d^2 + s^2) with s = sigma / alpha, the consistency models' c_skip(t = s) with
  eps = 0: in log-SNR form sigmoid(lambda + log sigma_d^2). 1 at lambda = +inf (in float32 already at the
  schedule's lambda_max = 20), 1/2 where s = sigma_d, ~0 at high noise."""
  return jax.nn.sigmoid(jnp.asarray(logsnr, jnp.float32) + 2.0 * jnp.log(sigma_data))


def consistency_output(pred, *, z, logsnr):
  """f(z, lambda) = c_skip z / alpha + (1 - c_skip) x_hat: the boundary-condition parameterisation.

  f(z, lambda_max) = z / alpha, the identity on the ODE's data end; at high noise f is the network's x prediction,
  so a teacher or a PD student initialises it. The consistency models' c_out scales a raw output by
  sigma_d s / sqrt(sigma_d^2 + s^2); here the head's own x prediction (of whatever type) takes 1 - c_skip.
  """
  alpha, _ = coefficients(logsnr, z)
  c_skip = expand(skip_coefficient(logsnr), z)
  return from_x(x=c_skip * (z / alpha) + (1.0 - c_skip) * pred.x, z=z, logsnr=logsnr)


def predict(*, output, z, logsnr, output_type):
  """Model output -> Prediction(x, eps, v).

  'both' has two heads on the channel axis, [x_out, eps_out], mixed by noise level as in progressive
  distillation: x = sigma^2 x_out + alpha^2 x(eps_out), which trusts x_out at high noise and eps_out at low.
  """
  output = output.astype(jnp.float32)
  if is_consistency(output_type):
    pred = predict(output=output, z=z, logsnr=logsnr, output_type=head_type(output_type))
    return consistency_output(pred, z=z, logsnr=logsnr)
  if output_type == 'x':
    chex.assert_equal_shape([output, z])
    x = output
    eps = eps_from_x(z=z, x=x, logsnr=logsnr)
  elif output_type == 'eps':
    chex.assert_equal_shape([output, z])
    eps = output
    x = x_from_eps(z=z, eps=eps, logsnr=logsnr)
  elif output_type == 'v':
    chex.assert_equal_shape([output, z])
    x = x_from_v(z=z, v=output, logsnr=logsnr)
    eps = eps_from_v(z=z, v=output, logsnr=logsnr)
  elif output_type == 'both':
    chex.assert_shape(output, z.shape[:-1] + (2 * z.shape[-1],))
    x_out, eps_out = jnp.split(output, 2, axis=-1)
    alpha, sigma = coefficients(logsnr, z)
    x = sigma**2 * x_out + alpha**2 * x_from_eps(z=z, eps=eps_out, logsnr=logsnr)
    eps = eps_from_x(z=z, x=x, logsnr=logsnr)
  else:
    raise ValueError(f'output_type must be one of {OUTPUT_TYPES} (or one of them prefixed {CONSISTENCY!r}), got '
                     f'{output_type!r}')
  return Prediction(x=x, eps=eps, v=v_from_x_eps(x=x, eps=eps, logsnr=logsnr))


def from_x(*, x, z, logsnr):
  """The Prediction consistent with an x estimate at (z, logsnr)."""
  eps = eps_from_x(z=z, x=x, logsnr=logsnr)
  return Prediction(x=x, eps=eps, v=v_from_x_eps(x=x, eps=eps, logsnr=logsnr))


def clip_x(pred, *, z, logsnr):
  """Clip x to [-1, 1] and re-derive eps and v from it, so the three stay consistent at (z, logsnr)."""
  return from_x(x=jnp.clip(pred.x, -1.0, 1.0), z=z, logsnr=logsnr)
