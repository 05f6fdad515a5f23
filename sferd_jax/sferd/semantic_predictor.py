"""SFERD's semantic gradient predictor as maths around the modules (SFERD.md §4): its training targets, the shift
of the student's prediction, the loss, code sensitivity, and the shifted student that samplers run.

E_phi and G_tau (models/semantic.py) are trained jointly on a frozen student. G_tau's output is a gradient
g ~ grad_{z_t} log p(z_sem | z_t); by Tweedie, adding it to the student's score moves the x estimate by
sigma_t^2 / alpha_t times it: x_hat' = x_hat + (sigma_t^2 / alpha_t) g, at the student's own log-SNR lambda_t (the
official code evaluates the coefficient at the teacher's lambda_s, which is a bug).

The target must depend on x0 beyond z_t, or the best G_tau ignores its code (PD's target is a deterministic
function of z_t: measured, code sensitivity falls towards 0 while the shift grows). TARGETS:
  teacher_on_data (default; the official code): the guided teacher's x prediction at s = t - 1/(2N) on
    z_s = alpha_s x0 + sigma_s eps, re-noised from the data with z_t's eps; one guided teacher call.
  x0 (PDAE's): the clean image itself.
  pd (PD's distillation target x_tilde(z_t)): kept as the capacity control; its code sensitivity stays ~0.
Loss weighting: a setting (the semantic phase's `loss`, PD's snr_trunc by default). The official code uses
mean((w (x_target - x'))^2) with w = 1 + SNR inside the square, i.e. (1 + SNR)^2 on the x error; PDAE uses an
eps-MSE with weight SNR^0.1 / (1 + SNR).

Usage in a jitted step (training/steps.py make_semantic_step does this):
    target = semantic_target(cfg.target, teacher=teacher_fn, x0=x0, eps=eps, z=z, i=i, num_steps=n,
                             logsnr_fn=logsnr_fn)
    (loss, metrics), grads = jax.value_and_grad(model_semantic_loss, has_aux=True)(
        semantic_params, student_params, encoder=..., predictor=..., student=..., x0=x0, z=z, logsnr=logsnr,
        target=target, ...)
"""

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import distillation
from sferd_jax.diffusion import losses
from sferd_jax.diffusion import process
from sferd_jax.models import semantic
from sferd_jax.models import unet

TARGETS = ('teacher_on_data', 'x0', 'pd')
# What G_tau's raw output d is: x_shift (d is the x shift, g = d / (sigma^2 / alpha)) or score (d = g, as PDAE).
GRADIENT_PARAMS = ('x_shift', 'score')
# PDAE's stop_percent: the last floor(0.3 N) sampling steps run unshifted (for N <= 3 that is none of them).
PDAE_STOP_FRACTION = 0.3

EncodeFn = Callable[..., jnp.ndarray]     # (encoder_params, x0) -> z_sem (B, latent_dim)
GradientFn = Callable[..., jnp.ndarray]   # (predictor_params, z, logsnr, z_sem) -> g, z's shape


def shift_coefficient(logsnr):
  """sigma^2 / alpha at log-SNR lambda (any shape), computed in log space.

  sigma^2 = sigmoid(-lambda) and alpha = sqrt(sigmoid(lambda)), so log(sigma^2 / alpha) = softplus(-lambda) / 2 -
  softplus(lambda): no sigmoid underflows, no 0/0. Values: e^10 ~ 2.2e4 at lambda = -20, 1/sqrt(2) at 0, e^-20 at
  20. Nothing needs clamping for finiteness: float32 holds it down to lambda ~ -177, and the schedule stops at -20.
  The large value is a conditioning matter instead: at lambda = -20 (every step of a 1-step student) a g of 1e-4
  moves x by ~2, so a network whose raw output is g must learn values ~1e-4 there and ~1 at lambda = 0, and a
  step of Adam on its zero-initialised last conv overshoots. G_tau therefore outputs the x shift d by
  default and g = d / coefficient (gradient_from_raw, gradient_param='x_shift'); 'score' outputs g itself.
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




def gradient_from_raw(raw, logsnr, gradient_param):
  """G_tau's raw output d -> g: d / (sigma^2 / alpha) for 'x_shift' (so the x shift is d itself), d for 'score'.

  Same maths either way, but at lambda = -20, where a 1-step student lives, sigma^2 / alpha = 2.2e4 and a raw g
  must be ~1e-4: on a 1-step toy (8 px digits, Adam 1e-4) 'score' jumped from loss 0.74 to 5.7 in 50 steps and
  reached 0.50 by step 300, 'x_shift' fell steadily to 0.24.
  """
  if gradient_param == 'score':
    return raw
  if gradient_param != 'x_shift':
    raise ValueError(f'gradient_param must be one of {GRADIENT_PARAMS}, got {gradient_param!r}')
  chex.assert_shape(logsnr, (raw.shape[0],))
  return raw / process.expand(shift_coefficient(logsnr), raw)


# Targets: each a Prediction consistent at the student's (z, logsnr), so any loss type (x or eps errors) applies.


def teacher_on_data_target(*, teacher, x0, eps, z, logsnr, logsnr_s):
  """The official code's target: the teacher's x at (z_s, lambda_s), z_s = alpha_s x0 + sigma_s eps.

  z_s is re-noised from the data with the eps that made z = z_t, so it carries x0 beyond what z_t does: the
  teacher at the lower noise level sees more of the image than the student can infer from z_t alone.
  teacher: (z, logsnr) -> Prediction, the (guided) teacher; logsnr_s (B,) is lambda at s = t - 1/(2N).
  """
  chex.assert_equal_shape([x0, eps, z])
  x_target = teacher(process.diffuse(x=x0, eps=eps, logsnr=logsnr_s), logsnr_s).x
  return process.from_x(x=x_target, z=z, logsnr=logsnr)


def x0_target(*, x0, z, logsnr):
  """PDAE's target: the clean image (its eps is then the true noise of z)."""
  chex.assert_equal_shape([x0, z])
  return process.from_x(x=x0, z=z, logsnr=logsnr)


def pd_target(*, teacher, z, i, num_steps, logsnr_fn):
  """PD's distillation target x_tilde(z_t): a function of z_t alone, so it gives G_tau nothing to learn from its
  code (the capacity control)."""
  return distillation.student_target(teacher_fn=teacher, z=z, i=i, num_steps=num_steps, logsnr_fn=logsnr_fn)


def semantic_target(kind, *, teacher, x0, eps, z, i, num_steps, logsnr_fn):
  """The target of TARGETS[kind] for a student of num_steps steps at its step i (B,), z = z_u, u = (i + 1) / N.

  Only the chosen target's teacher calls are traced: x0 needs none, teacher_on_data one, pd two.
  """
  n = jnp.asarray(num_steps, jnp.float32)
  u = (i.astype(jnp.float32) + 1.0) / n
  logsnr = logsnr_fn(u)
  if kind == 'teacher_on_data':
    return teacher_on_data_target(teacher=teacher, x0=x0, eps=eps, z=z, logsnr=logsnr, logsnr_s=logsnr_fn(u - 0.5 / n))
  if kind == 'x0':
    return x0_target(x0=x0, z=z, logsnr=logsnr)
  if kind == 'pd':
    return pd_target(teacher=teacher, z=z, i=i, num_steps=num_steps, logsnr_fn=logsnr_fn)
  raise ValueError(f'semantic target must be one of {TARGETS}, got {kind!r}')


# Code sensitivity: does the shifted prediction depend on the code at all?


def code_sensitivity(x_shifted, x_plain):
  """{'code_sensitivity': mean |x'(c_i) - x'(c_j)| over all pairs i < j of K codes at the same z_t,
      'shift_rms': RMS of x'(c) - x_hat over all codes}.

  x_shifted: (K, B, H, W, C), K >= 2, the shifted x predictions of the same B noisy inputs under K codes;
  x_plain: (B, H, W, C), the plain student's. A predictor that ignores its code has sensitivity 0 whatever its
  shift; one that carries semantics moves x apart for different codes.
  """
  chex.assert_rank(x_shifted, x_plain.ndim + 1)
  chex.assert_equal_shape([x_shifted[0], x_plain])
  k = x_shifted.shape[0]
  if k < 2:
    raise ValueError(f'code sensitivity needs at least 2 codes per input, got {k}')
  i, j = jnp.triu_indices(k, 1)
  return {'code_sensitivity': jnp.mean(jnp.abs(x_shifted[i] - x_shifted[j])),
          'shift_rms': jnp.sqrt(jnp.mean((x_shifted - x_plain[None])**2))}


def semantic_loss(semantic_params, *, encode_fn: EncodeFn, gradient_fn: GradientFn, student_pred, x0, z, logsnr,
                  target, loss_type='snr_trunc'):
  """Mean loss of the shifted student against `target`, and metrics; differentiable in
  semantic_params = {'encoder': ..., 'predictor': ...} only.

  Args:
    semantic_params: E_phi's and G_tau's params, as semantic.init_semantic_params returns them.
    encode_fn: (encoder_params, x0) -> z_sem.
    gradient_fn: (predictor_params, z, logsnr, z_sem) -> g with z's shape (closes over the student's features).
    student_pred: the frozen student's Prediction at (z, logsnr); gradients into it are stopped here as well.
    x0: (B, H, W, C) clean images, E_phi's input.
    z: (B, H, W, C) noisy images at the student's log-SNR `logsnr` (B,).
    target: the Prediction the shifted student regresses (semantic_target).
    loss_type: one of losses.LOSS_TYPES; 'snr_trunc' (PD's) by default.

  Returns:
    (loss, metrics): loss the batch mean; metrics {'loss', 'student_loss' (the plain student's, the baseline to
    beat), 'shift_rms', 'code_sensitivity' (code_sensitivity of each input's own code against the previous
    example's code, at the same z; no gradient)}.
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
  # The previous example's code at the same z (roll by one; 0 for a batch of one): the metric the predictor exists
  # for, at the cost of one more G_tau pass.
  g_other = gradient_fn(jax.lax.stop_gradient(semantic_params['predictor']), z, logsnr,
                        jax.lax.stop_gradient(jnp.roll(z_sem, 1, axis=0)))
  x_other = shift_x(x_hat=student_pred.x, g=g_other, logsnr=logsnr)
  sensitivity = code_sensitivity(jnp.stack([jax.lax.stop_gradient(pred.x), x_other]), student_pred.x)
  shift_rms = jnp.sqrt(jnp.mean((jax.lax.stop_gradient(pred.x) - student_pred.x)**2))
  return loss, {'loss': loss, 'student_loss': student_loss, 'shift_rms': shift_rms,
                'code_sensitivity': sensitivity['code_sensitivity']}


# Applying the predictor next to a frozen student.


def frozen_student(student, student_params, z, logsnr, labels=None, *, output_type):
  """The frozen student's Prediction at (z, logsnr) and its encoder features (h, skips, emb), both stop-gradient.

  One encoder pass serves the student's own decoder and the shift decoder (PDAE's ShiftUNet forward). Inference
  mode: the student is frozen, so no dropout. `student` is a unet.UNet, `student_params` its full params.
  """
  features = student.apply({'params': student_params}, z, logsnr, labels, train=False, method=unet.UNet.encode)
  features = jax.lax.stop_gradient(features)
  out = student.apply({'params': student_params}, *features, train=False, method=unet.UNet.decode)
  pred = process.predict(output=out, z=z, logsnr=logsnr, output_type=output_type)
  return jax.lax.stop_gradient(pred), features


def predict_gradient(predictor, predictor_params, *, z, logsnr, z_sem, gradient_param, features=None, train=False,
                     dropout_rng=None):
  """g (B, H, W, C) float32 from either form of G_tau.

  Args:
    predictor: a semantic.ShiftDecoder or semantic.SeparateGradientNet (make_semantic_models' second output).
    predictor_params: its params (the 'predictor' entry of init_semantic_params' tree).
    z: (B, H, W, C) noisy image at log-SNR `logsnr` (B,).
    z_sem: (B, latent_dim) semantic code.
    gradient_param: what the raw output is (GRADIENT_PARAMS; the semantic config's gradient_param).
    features: the student encoder's (h, skips, emb) at (z, logsnr) from frozen_student; required by 'shift'.
    train: enables the shift decoder's dropout (the student's dropout rate); needs dropout_rng.
    dropout_rng: a key for dropout, or None.
  """
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
  variables = {'params': predictor_params}
  if isinstance(predictor, semantic.ShiftDecoder):
    if features is None:
      raise ValueError("the 'shift' predictor reads the student encoder's features: pass features=(h, skips, emb) "
                       'from frozen_student')
    raw = predictor.apply(variables, *jax.lax.stop_gradient(features), z_sem, train=train, rngs=rngs)
  elif isinstance(predictor, semantic.SeparateGradientNet):
    raw = predictor.apply(variables, z, logsnr, z_sem, train=train, rngs=rngs)
  else:
    raise TypeError(f'predictor must be a ShiftDecoder or a SeparateGradientNet, got {type(predictor).__name__}')
  chex.assert_equal_shape([raw, z])
  return gradient_from_raw(raw, logsnr, gradient_param)


def model_semantic_loss(semantic_params, student_params, *, encoder, predictor, student, output_type, x0, z, logsnr,
                        target, gradient_param='x_shift', labels=None, loss_type='snr_trunc', train=False,
                        dropout_rng=None):
  """semantic_loss from the modules: the frozen student's pass, E_phi and G_tau all inside.

  student_params is an argument only so that one function serves a jitted step; its gradient is zero (the
  student's outputs are stop-gradient). In a train step differentiate w.r.t. semantic_params (argnums=0).
  """
  student_pred, features = frozen_student(student, student_params, z, logsnr, labels, output_type=output_type)

  def encode_fn(params, images):
    return encoder.apply({'params': params}, images)

  def gradient_fn(params, z_t, logsnr_t, z_sem):
    return predict_gradient(predictor, params, z=z_t, logsnr=logsnr_t, z_sem=z_sem, gradient_param=gradient_param,
                            features=features, train=train, dropout_rng=dropout_rng)

  return semantic_loss(semantic_params, encode_fn=encode_fn, gradient_fn=gradient_fn, student_pred=student_pred,
                       x0=x0, z=z, logsnr=logsnr, target=target, loss_type=loss_type)


def shift_active(logsnr, *, num_steps, stop_fraction, logsnr_fn):
  """(B,) bool: whether sampling step at `logsnr` of an N-step sampler is shifted (PDAE's switch-off).

  The last floor(stop_fraction * N) steps, at t = k / N for k <= m = floor(stop_fraction * N), run unshifted. The
  cut is placed half a step above t = m / N, so float rounding of the sampler's grid cannot move it. num_steps may
  be traced.
  """
  n = jnp.asarray(num_steps, jnp.float32)
  m = jnp.floor(stop_fraction * n + 1e-6)  # 0.3 * 10 = 3.0000000000000004 in float64; 2.9999998 in float32
  return logsnr < logsnr_fn((m + 0.5) / n)


def shifted_denoise_fn(*, student, student_params, output_type, predictor, predictor_params, z_sem, gradient_param,
                       labels=None, num_steps=None, stop_fraction=0.0, logsnr_fn=None):
  """denoise_fn(z, logsnr) -> the shifted student's Prediction, for samplers.sample_loop.

  z_sem (B, latent_dim) comes from E_phi of real images or from the latent diffusion (models/latent.py). With
  stop_fraction > 0 (and num_steps, logsnr_fn given) the last floor(stop_fraction * N) steps are the plain
  student's (shift_active). The sampler clips the shifted x (clip_x=True), as it does the plain student's.
  """
  if stop_fraction and (num_steps is None or logsnr_fn is None):
    raise ValueError('stop_fraction > 0 needs num_steps and logsnr_fn to know which steps are the last ones')

  def denoise_fn(z, logsnr):
    pred, features = frozen_student(student, student_params, z, logsnr, labels, output_type=output_type)
    g = predict_gradient(predictor, predictor_params, z=z, logsnr=logsnr, z_sem=z_sem, gradient_param=gradient_param,
                         features=features)
    if stop_fraction:
      g = jnp.where(process.expand(shift_active(logsnr, num_steps=num_steps, stop_fraction=stop_fraction,
                                                logsnr_fn=logsnr_fn), g), g, 0.0)
    return shifted_prediction(pred=pred, g=g, z=z, logsnr=logsnr)

  return denoise_fn


# Config entry point: the keys of config.sferd.semantic this module reads (models/semantic.py reads the others;
# config.py holds their defaults).

# What an export written before a key existed did: PD's target, no switch-off.
LEGACY_SETTINGS = dict(target='pd', gradient_param='x_shift', stop_fraction=0.0)


def setting(semantic_config, key):
  """A key of a semantic section (a config's, or an export's model.json), or, for an export written before the key
  existed, what that export was trained and sampled with (LEGACY_SETTINGS)."""
  return semantic_config[key] if key in semantic_config else LEGACY_SETTINGS[key]


def validate_config(semantic_config):
  """Raises ValueError naming the key for a semantic section this module cannot work with."""
  semantic.validate_semantic_config(semantic_config)
  if setting(semantic_config, 'target') not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {setting(semantic_config, 'target')!r}")
  if setting(semantic_config, 'gradient_param') not in GRADIENT_PARAMS:
    raise ValueError(f"gradient_param must be one of {GRADIENT_PARAMS}, got "
                     f"{setting(semantic_config, 'gradient_param')!r}")
  if not 0.0 <= setting(semantic_config, 'stop_fraction') < 1.0:
    raise ValueError(f"stop_fraction must be in [0, 1) (PDAE: {PDAE_STOP_FRACTION}; 0 = shift every step), got "
                     f"{setting(semantic_config, 'stop_fraction')}")
