"""Progressive distillation: the teacher's two DDIM steps and the student target that reproduces them in one.

A student of N steps learns from a teacher of 2N. For i in {0..N-1}, u = (i + 1) / N and z = alpha_u x + sigma_u eps,
the teacher takes two DDIM steps u -> u - 1/(2N) -> u - 1/N and lands on z''. The student's x target is the x whose
single DDIM step from z lands on z'' too; at i = 0 (the last step) it is the teacher's last x prediction.
The teacher runs unclipped here, as in progressive distillation.
"""

import chex
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers


def teacher_two_steps(*, teacher_fn, z, logsnr_t, logsnr_mid, logsnr_s):
  """Two DDIM steps of the teacher: returns (z'' at logsnr_s, the teacher's x prediction at logsnr_mid)."""
  pred = teacher_fn(z, logsnr_t)
  z_mid = samplers.ddim_step(pred=pred, logsnr_s=logsnr_mid)
  pred_mid = teacher_fn(z_mid, logsnr_mid)
  return samplers.ddim_step(pred=pred_mid, logsnr_s=logsnr_s), pred_mid.x


def student_x_target(*, z, z_teacher, logsnr_t, logsnr_s):
  """x_tilde = (z'' - r z) / (alpha_s - r alpha_t), r = sigma_s / sigma_t, so that one DDIM step lands on z''."""
  chex.assert_equal_shape([z, z_teacher])
  alpha_t, _ = process.coefficients(logsnr_t, z)
  alpha_s, _ = process.coefficients(logsnr_s, z)
  # sigma^2 = sigmoid(-lambda) => sigma_s / sigma_t = exp((softplus(lambda_t) - softplus(lambda_s)) / 2), stable.
  r = process.expand(jnp.exp(0.5 * (jax.nn.softplus(logsnr_t) - jax.nn.softplus(logsnr_s))), z)
  return (z_teacher - r * z) / (alpha_s - r * alpha_t)


def student_target(*, teacher_fn, z, i, num_steps, logsnr_fn):
  """The Prediction (x_tilde, eps_tilde, v_tilde) a student of num_steps steps regresses at step i, z = z_u.

  i: (B,) int32 in [0, num_steps); num_steps may be traced. teacher_fn(z, logsnr) -> Prediction.
  """
  chex.assert_rank(i, 1)
  n = jnp.asarray(num_steps, jnp.float32)
  u = (i.astype(jnp.float32) + 1.0) / n  # the student's time, as student_noise_level
  logsnr_t, logsnr_mid, logsnr_s = logsnr_fn(u), logsnr_fn(u - 0.5 / n), logsnr_fn(u - 1.0 / n)
  z_teacher, x_last = teacher_two_steps(teacher_fn=teacher_fn, z=z, logsnr_t=logsnr_t, logsnr_mid=logsnr_mid,
                                        logsnr_s=logsnr_s)
  x_target = student_x_target(z=z, z_teacher=z_teacher, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  last = process.expand(i == 0, z)
  x_target = jnp.where(last, x_last, x_target)
  return process.from_x(x=x_target, z=z, logsnr=logsnr_t)


def student_noise_level(*, i, num_steps, logsnr_fn):
  """The log-SNR at u = (i + 1) / N where the student is trained."""
  return logsnr_fn((i.astype(jnp.float32) + 1.0) / jnp.asarray(num_steps, jnp.float32))
