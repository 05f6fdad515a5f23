"""Consistency distillation: its maths against closed forms, its step, and the phase end to end on the tiny teacher."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import pipeline
from sferd_jax import sampling
from sferd_jax import sharding
from sferd_jax.diffusion import consistency
from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules
from sferd_jax.evaluation import evaluate
from sferd_jax.training import phases
from sferd_jax.training import state as state_lib
import test_training
import tiny

SHAPE = (3, 4, 4, 2)


def _noise(seed, shape=SHAPE):
  return jax.random.normal(jax.random.key(seed), shape)


def test_skip_coefficient_is_the_consistency_models_c_skip_and_one_at_the_data_end():
  logsnr = jnp.array([-20.0, -3.0, 0.0, 2.0, 20.0])
  s = np.exp(-np.asarray(logsnr, np.float64) / 2)  # sigma / alpha
  expected = 0.25 / (0.25 + s**2)                   # sigma_d^2 / (sigma_d^2 + s^2), sigma_d = 0.5
  np.testing.assert_allclose(process.skip_coefficient(logsnr), expected, rtol=1e-6, atol=1e-12)
  assert float(process.skip_coefficient(jnp.float32(schedules.LOGSNR_MAX))) == 1.0  # exactly, in float32


def test_the_boundary_condition_holds_whatever_the_network_predicts():
  z, x_net = _noise(0), 5.0 * _noise(1)
  logsnr = jnp.full((SHAPE[0],), schedules.LOGSNR_MAX)
  f = process.predict(output=x_net, z=z, logsnr=logsnr, output_type='consistency_x')
  alpha, _ = process.coefficients(logsnr, z)
  np.testing.assert_array_equal(f.x, z / alpha)
  # At high noise f is the head's own x prediction, whatever the head: a teacher or PD student initialises it
  # (at lambda = -20, c_skip z / alpha = sigma_d^2 alpha z / sigma^2 ~ 1e-5 z).
  low = jnp.full((SHAPE[0],), -20.0)
  for head in ('x', 'eps', 'v'):
    plain = process.predict(output=x_net, z=z, logsnr=low, output_type=head)
    cm = process.predict(output=x_net, z=z, logsnr=low, output_type='consistency_' + head)
    np.testing.assert_allclose(cm.x, plain.x, rtol=0, atol=1e-4)
  both = jnp.concatenate([x_net, _noise(2)], axis=-1)
  mid = jnp.full((SHAPE[0],), 0.5)
  c = process.skip_coefficient(0.5)
  plain = process.predict(output=both, z=z, logsnr=mid, output_type='both')
  np.testing.assert_allclose(process.predict(output=both, z=z, logsnr=mid, output_type='consistency_both').x,
                             c * z / process.coefficients(mid, z)[0] + (1 - c) * plain.x, rtol=1e-5, atol=1e-6)


def _point_teacher(x0):
  """A teacher of data that is one image x0: its x prediction is x0 everywhere, so the ODE path is exactly
  z_lambda = alpha x0 + sigma eps with a fixed eps."""
  return lambda z, logsnr: process.from_x(x=jnp.broadcast_to(x0, z.shape), z=z, logsnr=logsnr)


@pytest.mark.parametrize('solver', consistency.SOLVERS)
def test_an_ode_step_of_a_one_point_teacher_stays_on_its_path(solver):
  x0, eps = _noise(0), _noise(1)
  logsnr_t, logsnr_s = jnp.array([-20.0, -3.0, 1.0]), jnp.array([-4.0, 0.5, 20.0])
  z_t = process.diffuse(x=x0, eps=eps, logsnr=logsnr_t)
  z_s = consistency.ode_step(teacher_fn=_point_teacher(x0), z=z_t, logsnr_t=logsnr_t, logsnr_s=logsnr_s,
                             solver=solver)
  np.testing.assert_allclose(z_s, process.diffuse(x=x0, eps=eps, logsnr=logsnr_s), rtol=1e-4, atol=1e-4)


def _gaussian_teacher(c):
  """The exact denoiser of data N(0, c^2 I): x_hat = alpha c^2 z / (alpha^2 c^2 + sigma^2)."""
  def teacher(z, logsnr):
    alpha, sigma = process.coefficients(logsnr, z)
    return process.from_x(x=alpha * c**2 * z / (alpha**2 * c**2 + sigma**2), z=z, logsnr=logsnr)
  return teacher


def _gaussian_flow(z_t, logsnr_t, logsnr_s, c):
  """The exact probability-flow ODE of N(0, c^2 I) data: y = z / alpha scales by sqrt((c^2 + s_s^2) / (c^2 + s_t^2)),
  s = sigma / alpha."""
  s_t, s_s = np.exp(-logsnr_t / 2), np.exp(-logsnr_s / 2)
  alpha_t, alpha_s = np.sqrt(1 / (1 + np.exp(-logsnr_t))), np.sqrt(1 / (1 + np.exp(-logsnr_s)))
  return np.asarray(z_t, np.float64) / alpha_t * np.sqrt((c**2 + s_s**2) / (c**2 + s_t**2)) * alpha_s


def test_heun_is_second_order_where_ddim_is_first_on_a_gaussian():
  c, z = 0.5, _noise(3, (1, 4, 4, 1))
  logsnr_t, logsnr_s = -1.0, 1.0

  def error(solver, substeps):
    levels = np.linspace(logsnr_t, logsnr_s, substeps + 1)
    x = z
    for a, b in zip(levels[:-1], levels[1:]):
      x = consistency.ode_step(teacher_fn=_gaussian_teacher(c), z=x, logsnr_t=jnp.full((1,), a),
                               logsnr_s=jnp.full((1,), b), solver=solver)
    return float(np.max(np.abs(np.asarray(x, np.float64) - _gaussian_flow(z, logsnr_t, logsnr_s, c))))

  ddim, heun = [error('ddim', 4), error('ddim', 8)], [error('heun', 4), error('heun', 8)]
  assert heun[0] < ddim[0] / 10
  assert 1.6 < ddim[0] / ddim[1] < 2.4   # halving the step halves a first-order error ...
  assert 3.0 < heun[0] / heun[1] < 5.0   # ... and quarters a second-order one


def test_an_ode_step_from_the_noise_end_stays_finite_and_close_with_heun():
  """From lambda = -20 (sigma / alpha = 2.2e4) to the first grid level: Heun in EDM's variables would move z by
  hundreds here; in w = z / sigma, r = alpha / sigma it is as accurate as DDIM or better."""
  c, z = 0.5, _noise(4, (1, 4, 4, 1))
  t, s = jnp.full((1,), -20.0), jnp.full((1,), float(schedules.cosine_logsnr(17 / 18)))
  exact = _gaussian_flow(z, -20.0, float(s[0]), c)
  errors_ = {solver: float(np.max(np.abs(np.asarray(consistency.ode_step(
      teacher_fn=_gaussian_teacher(c), z=z, logsnr_t=t, logsnr_s=s, solver=solver)) - exact)))
             for solver in consistency.SOLVERS}
  assert errors_['heun'] <= errors_['ddim'] + 1e-6 and errors_['heun'] < 1e-2


def test_distances_against_their_closed_forms():
  a, b = _noise(5), _noise(6)
  d = a[0].size
  np.testing.assert_allclose(consistency.distance(a, b, kind='l2'), np.mean((a - b)**2, axis=(1, 2, 3)), rtol=1e-6)
  c = 0.00054 * math.sqrt(d)
  huber = consistency.distance(a, b, kind='pseudo_huber')
  np.testing.assert_allclose(huber, np.sqrt(np.sum((a - b)**2, axis=(1, 2, 3)) + c**2) - c, rtol=1e-6)
  np.testing.assert_array_equal(consistency.distance(a, a), np.zeros(SHAPE[0]))
  tiny_diff = consistency.distance(a, a + 1e-5)  # quadratic near 0: |a - b|^2 / (2c)
  np.testing.assert_allclose(tiny_diff, d * 1e-10 / (2 * c), rtol=1e-2)
  with pytest.raises(ValueError, match='distance'):
    consistency.distance(a, b, kind='lpips')


def test_num_scales_is_the_consistency_models_schedule():
  assert int(consistency.num_scales(123, start=18, end=18, total_steps=1000)) == 18
  k_total, s0, s1 = 1000, 2, 150
  for k in (0, 1, 250, 999, 1000):
    expected = math.ceil(math.sqrt(k / k_total * ((s1 + 1)**2 - s0**2) + s0**2) - 1) + 1
    assert int(consistency.num_scales(k, start=s0, end=s1, total_steps=k_total)) == min(expected, s1)


def test_the_target_network_is_an_ema_of_the_parameters():
  target, params = {'w': jnp.ones(3)}, {'w': jnp.full(3, 3.0)}
  np.testing.assert_allclose(consistency.update_target(target, params, decay=0.25)['w'], 0.25 + 0.75 * 3.0)
  np.testing.assert_array_equal(consistency.update_target(target, params, decay=0.0)['w'], params['w'])


def test_consistency_sampling_re_noises_the_x_prediction():
  x = _noise(7)
  denoise = lambda z, logsnr: process.from_x(x=jnp.broadcast_to(x, z.shape), z=z, logsnr=logsnr)
  z1, rng = _noise(8), jax.random.key(3)
  one = samplers.sample_loop(denoise_fn=denoise, z_init=z1, num_steps=1, rng=rng, sampler='consistency',
                             clip_x=False)
  np.testing.assert_allclose(one, x, rtol=1e-5, atol=1e-5)  # one step is the model's x, as DDIM's
  two = samplers.sample_loop(denoise_fn=denoise, z_init=z1, num_steps=2, rng=rng, sampler='consistency',
                             clip_x=False)
  np.testing.assert_allclose(two, x, rtol=1e-5, atol=1e-5)
  # A step diffuses the model's x to s with fresh noise from its key, not with the model's eps.
  logsnr_half = jnp.full((SHAPE[0],), schedules.cosine_logsnr(0.5))
  z_half = samplers.consistency_step(pred=denoise(z1, logsnr_half), logsnr_s=logsnr_half, rng=rng)
  np.testing.assert_allclose(z_half, process.diffuse(x=x, eps=jax.random.normal(rng, x.shape), logsnr=logsnr_half),
                             rtol=1e-6)


def test_the_sampler_resolves_to_a_models_own():
  assert sampling.resolve_sampler({'output_type': 'consistency_x'}, 'auto') == 'consistency'
  assert sampling.resolve_sampler({'output_type': 'x'}, 'auto') == 'ddim'
  assert sampling.resolve_sampler({'output_type': 'consistency_x'}, 'ddim') == 'ddim'


def _cd_config(teacher, **overrides):
  return tiny.load_config(**{'phases': ('consistency',), 'consistency.teacher': teacher, **overrides})


def test_with_one_interval_the_target_is_the_teachers_x(tiny_run):
  """N = 1: n = 0, the teacher steps from t = 1 to t = 0 (lambda_max), where theta- is the identity on z / alpha;
  so the target is the teacher's x at z_1 (to sigma_max / alpha_max = 4.5e-5), and a student initialised as the
  teacher starts with a loss of ~0."""
  workdir, _ = tiny_run
  config = _cd_config(os.path.join(workdir, 'teacher'), **{'consistency.num_scales_start': 1,
                                                            'consistency.num_scales_end': 1})
  spec = phases.build(config, 'consistency')
  teacher = exports.load(os.path.join(workdir, 'teacher')).params
  batch = phases.make_batches(config, spec).get(0, 1)
  state, metrics = tiny.run_step_on(jax.local_devices()[:1], spec.step, lambda: spec.init(teacher), batch,
                                    extra=(teacher,))
  assert float(metrics['loss'][0]) < 1e-3 and int(metrics['num_scales'][0]) == 1
  # The target network moved by (1 - mu) of the update: tiny's target_decay is 0.5.
  jax.tree.map(lambda t, p, p0: np.testing.assert_allclose(t, 0.5 * p0 + 0.5 * p, rtol=1e-5, atol=1e-7),
               state.target_params, state.params, teacher)


def test_the_guided_teacher_drives_the_ode_step(tiny_run):
  """attention_guidance.enabled changes the consistency target (the same guided teacher as PD's), from the same
  state and batch."""
  workdir, _ = tiny_run
  teacher = exports.load(os.path.join(workdir, 'teacher')).params
  losses = {}
  for enabled in (False, True):
    config = _cd_config(os.path.join(workdir, 'teacher'), **{'sferd.attention_guidance.enabled': enabled})
    spec = phases.build(config, 'consistency')
    batch = phases.make_batches(config, spec).get(0, 1)
    _, metrics = tiny.run_step_on(jax.local_devices()[:1], spec.step, lambda spec=spec: spec.init(teacher), batch,
                                  extra=(teacher,))
    losses[enabled] = float(metrics['loss'][0])
  assert np.isfinite(list(losses.values())).all() and losses[True] != losses[False]


def test_a_pd_student_initialises_the_consistency_model(tiny_run, tmp_path):
  workdir, _ = tiny_run
  config = _cd_config(os.path.join(workdir, 'teacher'), **{'consistency.init': os.path.join(workdir, 'distill',
                                                                                             'stage_1')})
  spec = phases.build(config, 'consistency')
  [job] = phases.jobs(config, str(tmp_path), spec, mesh=sharding.make_mesh())
  inputs = job.prepare()
  stage_1 = exports.load(os.path.join(workdir, 'distill', 'stage_1'))
  assert exports.fingerprint(inputs.init_args[0]) == exports.fingerprint(stage_1.params) == inputs.meta['init']
  assert inputs.meta['teacher'] == exports.fingerprint(exports.load(os.path.join(workdir, 'teacher')).params)
  assert inputs.info['init'] == stage_1.path and inputs.info['model']['output_type'] == 'consistency_x'


def test_guided_cd_killed_and_resumed_equals_uninterrupted_then_samples_and_evaluates(tiny_run, tmp_path,
                                                                                     monkeypatch):
  workdir, _ = tiny_run
  config = _cd_config(os.path.join(workdir, 'teacher'), **{'consistency.train_steps': 3,
                                                            'sferd.attention_guidance.enabled': True})
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  pipeline.run_pipeline(config, straight)
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: test_training._Interrupting(real(*a, **k), after=3))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_pipeline(config, resumed)
  monkeypatch.setattr(phases, 'make_batches', real)
  pipeline.run_pipeline(config, resumed)
  with open(os.path.join(resumed, 'consistency', 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]
  a, b = exports.load(straight), exports.load(resumed)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert b.path.endswith(os.path.join('consistency', 'model'))  # a run folder's model, with no stage
  assert b.config.model.output_type == 'consistency_x' and b.config.num_steps == config.consistency.num_steps
  assert b.config.attention_guidance['enabled'] and b.config.teacher_fingerprint == exports.fingerprint(
      exports.load(os.path.join(workdir, 'teacher')).params)
  # One step of its own sampler is one evaluation of f, as DDIM's is; more steps re-noise.
  one = b.sample(jax.random.key(1), num_samples=4, num_steps=1)
  np.testing.assert_array_equal(one, b.sample(jax.random.key(1), num_samples=4, num_steps=1, sampler='ddim'))
  assert not np.array_equal(b.sample(jax.random.key(1), num_samples=4),
                            b.sample(jax.random.key(1), num_samples=4, sampler='ddim'))
  # SFERD on CD: a semantic predictor and its latent model on the consistency model, trained with the same
  # (guided) teacher, then loaded with it and sampled with its own sampler.
  predictor_config = _cd_config(os.path.join(workdir, 'teacher'), **{
      'phases': ('semantic', 'latent'), 'consistency.semantic': True, 'sferd.semantic.stages': (),
      'sferd.attention_guidance.enabled': True})
  pipeline.run_pipeline(predictor_config, resumed)
  c = exports.load(resumed)
  assert c.path == b.path and c.has_semantic
  assert exports.read_info(os.path.join(resumed, 'consistency', 'semantic', 'model'))['name'] == 'consistency_semantic'
  shifted = c.sample(jax.random.key(1), num_samples=4, semantic=True)
  assert shifted.shape == (4, 8, 8, 1) and not np.array_equal(shifted, c.sample(jax.random.key(1), num_samples=4))
  # The evaluation scores it like a student, with its own sampler, with and without its predictor.
  eval_config = tiny.load_config(**{'phases': ('evaluate',), 'evaluate.models': ('consistency',),
                                    'evaluate.num_samples': 16, 'evaluate.round_size': 16,
                                    'evaluate.kid_subsets': 4, 'evaluate.kid_subset_size': 8,
                                    'evaluate.classifier_steps': 5, 'evaluate.semantic': (False, True)})
  pipeline.run_pipeline(eval_config, resumed)
  with open(os.path.join(resumed, 'evaluate', evaluate.RESULTS_JSON)) as f:
    rows = json.load(f)
  assert [(r['model'], r['semantic'], r['sampler'], r['num_steps']) for r in rows] == [
      ('consistency', False, 'consistency', 2), ('consistency', True, 'consistency', 2)]
  assert all(np.isfinite(r['fid']) for r in rows)


def test_a_missing_teacher_or_a_bad_setting_is_a_clear_error(tmp_path):
  with pytest.raises(errors.CheckpointError, match='no teacher to distil .* config.consistency.teacher'):
    pipeline.run_pipeline(_cd_config(str(tmp_path / 'nowhere')), str(tmp_path / 'run'))
  for key, value, message in (('consistency.solver', 'euler', 'consistency.solver'),
                              ('consistency.loss', 'lpips', 'consistency.loss'),
                              ('consistency.target_decay', 1.0, 'consistency.target_decay')):
    with pytest.raises(errors.ConfigError, match=message):
      config_lib.validate(tiny.load_config(**{key: value}))


def test_consistency_state_keeps_the_other_phases_checkpoints_as_they_were():
  """Only the consistency phase's state carries the target network: a teacher's checkpoint has no new key."""
  params = {'w': jnp.ones(2)}
  tx, _ = state_lib.make_optimizer(tiny.load_config().teacher.optimizer, 10)
  plain = state_lib.TrainState.create(params=params, tx=tx, ema_decay=0.0)
  cd = state_lib.ConsistencyState.create(params=params, tx=tx, ema_decay=0.0)
  assert not hasattr(plain, 'target_params')
  np.testing.assert_array_equal(cd.target_params['w'], params['w'])
  assert len(jax.tree.leaves(cd)) == len(jax.tree.leaves(plain)) + 1
