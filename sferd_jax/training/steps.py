"""One pure step per phase. Each takes (state, batch, rng, *extra) and returns (state, metrics).

The step folds the state's step counter into the base key, so a resumed run draws the same noise as an
uninterrupted one. `scan_steps` runs several steps per host call.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sferd_jax.diffusion import consistency
from sferd_jax.diffusion import distillation
from sferd_jax.diffusion import losses
from sferd_jax.diffusion import process
from sferd_jax.diffusion import schedules
from sferd_jax.models import denoiser
from sferd_jax.models import latent
from sferd_jax.sferd import semantic_predictor
from sferd_jax.training import state as state_lib


def _noise_batch(rng, x, *, logsnr_fn):
  """Uniform t, its log-SNR, Gaussian noise and z_t for a batch of clean images."""
  t_rng, eps_rng = jax.random.split(rng)
  t = jax.random.uniform(t_rng, (x.shape[0],))
  logsnr = logsnr_fn(t)
  eps = jax.random.normal(eps_rng, x.shape, x.dtype)
  return process.diffuse(x=x, eps=eps, logsnr=logsnr), eps, logsnr


def _finish(state, grads, loss, *, tx, ema_decay, schedule):
  new_state = state_lib.apply_gradients(state, grads, tx=tx, ema_decay=ema_decay)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': schedule(state.step)}
  return new_state, metrics


def make_teacher_step(*, model, model_config, diffusion_config, train_config, tx, schedule):
  """The base diffusion model's step: denoise z_t at a uniformly drawn t."""
  logsnr_fn = lambda t: schedules.cosine_logsnr(t, **diffusion_config)

  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    noise_rng, dropout_rng = jax.random.split(rng)
    x = batch['image']
    labels = denoiser.labels_or_none(model_config, batch['label'])
    z, eps, logsnr = _noise_batch(noise_rng, x, logsnr_fn=logsnr_fn)

    def loss_fn(params):
      pred = denoiser.denoise(model, params, z, logsnr, labels, output_type=model_config.output_type, train=True,
                              dropout_rng=dropout_rng)
      return jnp.mean(losses.denoising_loss(pred=pred, x_target=x, eps_target=eps, logsnr=logsnr,
                                            loss_type=train_config.loss))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return _finish(state, grads, loss, tx=tx, ema_decay=train_config.ema_decay, schedule=schedule)

  return step


class DistillationBatch(NamedTuple):
  """What a distillation-target step trains on: the noisy images at the student's levels and their targets."""
  x: jax.Array
  labels: Optional[jax.Array]
  z: jax.Array
  logsnr: jax.Array
  target: process.Prediction   # the (guided) teacher's target, stop-gradient
  dropout_rng: jax.Array


class StudentNoise(NamedTuple):
  """Clean images and their noisy versions at a student's sampling levels u = (i + 1) / N."""
  x: jax.Array
  labels: Optional[jax.Array]
  i: jax.Array        # (B,) the student's step index
  eps: jax.Array
  z: jax.Array
  logsnr: jax.Array
  dropout_rng: jax.Array


def _student_noise(rng, batch, *, model_config, logsnr_fn, num_student_steps):
  """Draws i in [0, N), z at the student's noise level u = (i + 1) / N, and a dropout key."""
  step_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  x = batch['image']
  labels = denoiser.labels_or_none(model_config, batch['label'])
  i = jax.random.randint(step_rng, (x.shape[0],), 0, num_student_steps)
  logsnr = distillation.student_noise_level(i=i, num_steps=num_student_steps, logsnr_fn=logsnr_fn)
  eps = jax.random.normal(noise_rng, x.shape, x.dtype)
  z = process.diffuse(x=x, eps=eps, logsnr=logsnr)
  return StudentNoise(x=x, labels=labels, i=i, eps=eps, z=z, logsnr=logsnr, dropout_rng=dropout_rng)


def _distillation_batch(rng, batch, *, model_config, logsnr_fn, teacher_fn, teacher_params, num_student_steps):
  """_student_noise plus the teacher's PD target there."""
  n = _student_noise(rng, batch, model_config=model_config, logsnr_fn=logsnr_fn, num_student_steps=num_student_steps)
  teacher = teacher_fn(jax.lax.stop_gradient(teacher_params), n.labels)
  target = jax.lax.stop_gradient(distillation.student_target(teacher_fn=teacher, z=n.z, i=n.i,
                                                             num_steps=num_student_steps, logsnr_fn=logsnr_fn))
  return DistillationBatch(x=n.x, labels=n.labels, z=n.z, logsnr=n.logsnr, target=target, dropout_rng=n.dropout_rng)


def make_distill_step(*, model, model_config, diffusion_config, train_config, tx, schedule, teacher_fn):
  """The progressive-distillation step: step(state, batch, rng, teacher_params, num_student_steps).

  The teacher's parameters and the student's step count are arguments (the count traced), so one compilation
  serves every stage of a run. teacher_fn(params, labels) -> denoise_fn builds the teacher's prediction (plain,
  or attention-guided: sferd.guided_teacher.denoise_factory); no gradient reaches it.
  """
  logsnr_fn = lambda t: schedules.cosine_logsnr(t, **diffusion_config)

  def step(state, batch, rng, teacher_params, num_student_steps):
    b = _distillation_batch(jax.random.fold_in(rng, state.step), batch, model_config=model_config,
                            logsnr_fn=logsnr_fn, teacher_fn=teacher_fn, teacher_params=teacher_params,
                            num_student_steps=num_student_steps)

    def loss_fn(params):
      pred = denoiser.denoise(model, params, b.z, b.logsnr, b.labels, output_type=model_config.output_type,
                              train=True, dropout_rng=b.dropout_rng)
      return jnp.mean(losses.denoising_loss(pred=pred, x_target=b.target.x, eps_target=b.target.eps,
                                            logsnr=b.logsnr, loss_type=train_config.loss))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return _finish(state, grads, loss, tx=tx, ema_decay=train_config.ema_decay, schedule=schedule)

  return step


def make_consistency_step(*, model, output_type, model_config, diffusion_config, train_config, tx, schedule,
                          teacher_fn):
  """The consistency-distillation step (diffusion/consistency.py): step(state, batch, rng, teacher_params).

  state is a ConsistencyState: params theta (output type `output_type`, 'consistency_<head>') and the target theta-.
  The teacher's one ODE step from t_{n+1} to t_n (plain or attention-guided teacher_fn, as in make_distill_step)
  gives z_n; theta- maps it to the target of f_theta(z_{n+1}). The grid's size N(k) follows the step counter.
  train_config: the consistency section (config.consistency: its solver, distance (loss), scales, target decay).
  """
  logsnr_fn = lambda t: schedules.cosine_logsnr(t, **diffusion_config)
  cfg = train_config

  def step(state, batch, rng, teacher_params):
    rng = jax.random.fold_in(rng, state.step)
    n_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    x = batch['image']
    labels = denoiser.labels_or_none(model_config, batch['label'])
    num = consistency.num_scales(state.step, start=cfg.num_scales_start, end=cfg.num_scales_end,
                                 total_steps=train_config.train_steps)
    n = jax.random.randint(n_rng, (x.shape[0],), 0, num)
    logsnr_next, logsnr_now = consistency.grid_levels(n, num, logsnr_fn=logsnr_fn)
    z_next = process.diffuse(x=x, eps=jax.random.normal(noise_rng, x.shape, x.dtype), logsnr=logsnr_next)
    teacher = teacher_fn(jax.lax.stop_gradient(teacher_params), labels)
    z_now = consistency.ode_step(teacher_fn=teacher, z=z_next, logsnr_t=logsnr_next, logsnr_s=logsnr_now,
                                 solver=cfg.solver)
    # The target network runs in inference mode: no dropout noise in what the student regresses.
    target = denoiser.denoise(model, state.target_params, jax.lax.stop_gradient(z_now), logsnr_now, labels,
                              output_type=output_type)
    target_x = jax.lax.stop_gradient(target.x)

    def loss_fn(params):
      pred = denoiser.denoise(model, params, z_next, logsnr_next, labels, output_type=output_type, train=True,
                              dropout_rng=dropout_rng)
      return jnp.mean(consistency.distance(pred.x, target_x, kind=cfg.loss))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, metrics = _finish(state, grads, loss, tx=tx, ema_decay=train_config.ema_decay, schedule=schedule)
    new_state = new_state.replace(target_params=consistency.update_target(
        state.target_params, new_state.params, decay=cfg.target_decay))
    return new_state, dict(metrics, num_scales=num)

  return step


def make_semantic_step(*, student, encoder, predictor, model_config, semantic_config, diffusion_config, train_config,
                       tx, schedule, teacher_fn, output_type=None):
  """Trains E_phi and G_tau (state.params = {'encoder', 'predictor'}) on a frozen student of a finished stage.

  step(state, batch, rng, student_params, teacher_params, num_student_steps): at the student's noise levels, the
  shifted student's prediction x + (sigma^2 / alpha) g regresses semantic_config.target (sferd/semantic_predictor.py:
  the guided teacher on re-noised data by default). Metrics add the plain student's loss and the code sensitivity.
  output_type: the student's (a consistency model's 'consistency_<head>'); None = model_config's.
  """
  output_type = output_type or model_config.output_type
  logsnr_fn = lambda t: schedules.cosine_logsnr(t, **diffusion_config)
  target_kind = semantic_predictor.setting(semantic_config, 'target')
  gradient_param = semantic_predictor.setting(semantic_config, 'gradient_param')

  def step(state, batch, rng, student_params, teacher_params, num_student_steps):
    n = _student_noise(jax.random.fold_in(rng, state.step), batch, model_config=model_config, logsnr_fn=logsnr_fn,
                       num_student_steps=num_student_steps)
    teacher = teacher_fn(jax.lax.stop_gradient(teacher_params), n.labels)
    target = jax.lax.stop_gradient(semantic_predictor.semantic_target(
        target_kind, teacher=teacher, x0=n.x, eps=n.eps, z=n.z, i=n.i, num_steps=num_student_steps,
        logsnr_fn=logsnr_fn))
    loss_fn = functools.partial(semantic_predictor.model_semantic_loss, encoder=encoder, predictor=predictor,
                                student=student, output_type=output_type, x0=n.x, z=n.z,
                                logsnr=n.logsnr, target=target, gradient_param=gradient_param, labels=n.labels,
                                loss_type=train_config.loss, train=True, dropout_rng=n.dropout_rng)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, student_params)
    new_state, metrics = _finish(state, grads, loss, tx=tx, ema_decay=train_config.ema_decay, schedule=schedule)
    return new_state, dict(metrics, **{k: aux[k] for k in ('student_loss', 'shift_rms', 'code_sensitivity')})

  return step


def make_latent_step(*, model, diffusion_config, train_config, tx, schedule):
  """Trains the latent diffusion model on normalised semantic codes: batch['image'] is (B, latent_dim), and
  batch['label'] (B,) their images' classes, used when the model is class-conditional."""

  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    loss, grads = jax.value_and_grad(functools.partial(
        latent.latent_loss, model=model, codes=batch['image'], rng=rng, loss_type=train_config.loss,
        labels=batch['label'] if model.num_classes else None, **diffusion_config))(state.params)
    return _finish(state, grads, loss, tx=tx, ema_decay=train_config.ema_decay, schedule=schedule)

  return step


def scan_steps(step):
  """Runs step over a leading axis of batches (steps_per_call of them); metrics come back stacked.

  On GPU/TPU a rolled lax.scan keeps compilation short. XLA:CPU runs a U-Net step inside a while loop 20-35x
  slower than outside one (measured: 13 s vs 0.57 s per quickstart step), and lax.scan(unroll=True) of length 1
  is still a while loop, so on CPU the steps are a traced Python loop.
  """
  def multi_step(state, batches, rng, *extra):
    if jax.default_backend() != 'cpu':
      return jax.lax.scan(lambda s, b: step(s, b, rng, *extra), state, batches)
    metrics = []
    for k in range(jax.tree.leaves(batches)[0].shape[0]):
      state, m = step(state, jax.tree.map(lambda x, k=k: x[k], batches), rng, *extra)
      metrics.append(m)
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)
  return multi_step
