"""The semantic gradient shift of the student's prediction and its training loss (SFERD.md §4). Pure maths.

G_tau predicts g ~ grad_{z_t} log p(z_sem | z_t). By Tweedie, adding that score to the student's moves its x
estimate by sigma_t^2 / alpha_t times it: x_hat' = x_hat + (sigma_t^2 / alpha_t) g, at the student's own log-SNR
lambda_t (the official code evaluates the coefficient at the teacher's lambda_s, which is a bug).

The loss trains E_phi and G_tau with the student frozen, against the (guided) teacher's distillation target that
the caller computes with diffusion.distillation.student_target. The student enters as a fixed Prediction, E_phi and
G_tau as callables of their own params, so the whole loss jits and differentiates w.r.t. the semantic params only:

    pred, features = semantic.frozen_student(student, student_params, z, logsnr, labels, output_type=...)
    encode_fn = lambda p, x0: encoder.apply({'params': p}, x0)
    gradient_fn = lambda p, z, logsnr, z_sem: semantic.predict_gradient(predictor, p, z=z, logsnr=logsnr,
                                                                        z_sem=z_sem, features=features)
    (loss, metrics), grads = jax.value_and_grad(semantic_loss, has_aux=True)(
        semantic_params, encode_fn=encode_fn, gradient_fn=gradient_fn, student_pred=pred, x0=x0, z=z,
        logsnr=logsnr, target=target)

models/semantic.py's model_semantic_loss does exactly that from the modules, and its shifted_denoise_fn is the
sampler's view of the shifted student.
"""

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import losses
from sferd_jax.diffusion import process

EncodeFn = Callable[..., jnp.ndarray]     # (encoder_params, x0) -> z_sem (B, latent_dim)
GradientFn = Callable[..., jnp.ndarray]   # (predictor_params, z, logsnr, z_sem) -> g, z's shape


def shift_coefficient(logsnr):
  """sigma^2 / alpha at log-SNR lambda (any shape), computed in log space.

  sigma^2 = sigmoid(-lambda) and alpha = sqrt(sigmoid(lambda)), so log(sigma^2 / alpha) = softplus(-lambda) / 2 -
  softplus(lambda): no sigmoid underflows, no 0/0. Values: e^10 ~ 2.2e4 at lambda = -20, 1/sqrt(2) at 0, e^-20 at
  20. Nothing needs clamping for finiteness: float32 holds it down to lambda ~ -177, and the schedule stops at -20.
  The large value is a conditioning matter instead: at lambda = -20 (every step of a 1-step student) a g of 1e-4
  moves x by ~2, so a network whose raw output is g must learn values ~1e-4 there and ~1 at lambda = 0, and a
  step of Adam on its zero-initialised last conv overshoots. models/semantic.py's predictors therefore output the
  x shift d by default and return g = d / coefficient (gradient_param='x_shift'); 'score' outputs g itself.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.exp(0.5 * jax.nn.softplus(-logsnr) - jax.nn.softplus(logsnr))


def shift_x(*, x_hat, g, logsnr):
  """x_hat' = x_hat + (sigma_t^2 / alpha_t) g; x_hat and g (B, ...) alike, logsnr (B,) the student's lambda_t."""
  chex.assert_equal_shape([x_hat, g])
  return x_hat + process.expand(shift_coefficient(logsnr), x_hat) * g


def shifted_prediction(*, pred, g, z, logsnr):
  """The student's Prediction at (z, logsnr) with x shifted by g; eps and v follow so the three stay consistent.

  For a consistent pred (z = alpha x + sigma eps, as process.predict returns), re-deriving eps and v from x' at
  (z, logsnr) gives, exactly, eps' = eps - sigma g and v' = v - (sigma / alpha) g. Those closed forms are used:
  they avoid eps_from_x's division by a small sigma at high log-SNR, and with g = 0 they return pred bitwise,
  whatever the student's output type.
  """
  chex.assert_equal_shape([pred.x, pred.eps, pred.v, g, z])
  alpha, sigma = process.coefficients(logsnr, z)
  return process.Prediction(x=shift_x(x_hat=pred.x, g=g, logsnr=logsnr), eps=pred.eps - sigma * g,
                            v=pred.v - (sigma / alpha) * g)


def semantic_loss(semantic_params, *, encode_fn: EncodeFn, gradient_fn: GradientFn, student_pred, x0, z, logsnr,
                  target, loss_type='snr_trunc'):
  """Mean loss of the shifted student against the distillation target, and metrics; differentiable in
  semantic_params = {'encoder': ..., 'predictor': ...} only.

  Args:
    semantic_params: E_phi's and G_tau's params, as init_semantic_params returns them.
    encode_fn: (encoder_params, x0) -> z_sem.
    gradient_fn: (predictor_params, z, logsnr, z_sem) -> g with z's shape (closes over the student's features).
    student_pred: the frozen student's Prediction at (z, logsnr); gradients into it are stopped here as well.
    x0: (B, H, W, C) clean images, E_phi's input.
    z: (B, H, W, C) noisy images at the student's log-SNR `logsnr` (B,).
    target: the Prediction the student regresses, from distillation.student_target with the (guided) teacher.
    loss_type: one of losses.LOSS_TYPES; 'snr_trunc' (PD's) by default.

  Returns:
    (loss, metrics): loss the batch mean; metrics {'loss', 'student_loss' (the plain student's, the baseline to
    beat), 'shift_rms' (RMS of the x shift (sigma^2 / alpha) g)}.
  """
  student_pred = jax.lax.stop_gradient(student_pred)
  target = jax.lax.stop_gradient(target)
  z_sem = encode_fn(semantic_params['encoder'], x0)
  chex.assert_rank(z_sem, 2)
  g = gradient_fn(semantic_params['predictor'], z, logsnr, z_sem)
  pred = shifted_prediction(pred=student_pred, g=g, z=z, logsnr=logsnr)
  loss = losses.denoising_loss(pred=pred, x_target=target.x, eps_target=target.eps, logsnr=logsnr,
                               loss_type=loss_type).mean()
  student_loss = losses.denoising_loss(pred=student_pred, x_target=target.x, eps_target=target.eps, logsnr=logsnr,
                                       loss_type=loss_type).mean()
  shift_rms = jnp.sqrt(jnp.mean((pred.x - student_pred.x)**2))
  return loss, {'loss': loss, 'student_loss': student_loss, 'shift_rms': shift_rms}
