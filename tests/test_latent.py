"""The latent diffusion over semantic codes: statistics, the MLPSkipNet denoiser, its loss and its sampler."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sferd_jax.models import latent

_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
DIM = 8


def _mixture(n, seed, dim=DIM):
  """n codes of a 4-mode Gaussian mixture, offset and scaled like raw encoder outputs would be."""
  centres = np.random.default_rng(0).normal(size=(4, dim)) * 3.0
  rng = np.random.default_rng(seed)
  return jnp.asarray(5.0 + 2.0 * (centres[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, dim))), jnp.float32)


def _model(**kwargs):
  return latent.MLPSkipNet(**{'num_layers': 4, 'width': 64, **kwargs})


def _init(model, dim=DIM):
  return _jit(functools.partial(latent.init_latent_params, model, dim=dim))(jax.random.key(0))


def test_statistics_and_normalize_round_trip():
  codes = _mixture(512, 1)
  stats = latent.latent_statistics(codes)
  assert stats.mean.shape == stats.std.shape == (DIM,)
  np.testing.assert_allclose(stats.mean, np.mean(np.asarray(codes, np.float64), axis=0), rtol=1e-5)
  np.testing.assert_allclose(stats.std, np.std(np.asarray(codes, np.float64), axis=0), rtol=1e-4)
  normal = latent.normalize(codes, stats)
  np.testing.assert_allclose(normal.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(normal.std(0), 1.0, rtol=1e-4)
  np.testing.assert_allclose(latent.denormalize(normal, stats), codes, rtol=1e-5, atol=1e-5)
  # A dimension the encoder keeps constant: its std is floored, so normalising stays finite.
  flat = codes.at[:, 3].set(2.5)
  stats = latent.latent_statistics(flat, min_std=1e-3)
  assert float(stats.std[3]) == pytest.approx(1e-3)
  assert np.all(np.isfinite(latent.normalize(flat, stats)))


def test_mlp_skip_net_shapes_skips_and_zero_output():
  model = _model(num_layers=5, width=32)
  x = jnp.ones((3, DIM))
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x, jnp.zeros((3,)))
  assert out.shape == (3, DIM) and out.dtype == jnp.float32
  params = variables['params']
  # num_layers Dense layers: 4 hidden of width 32, the ones after the first fed [h, x], and the output.
  assert params['dense0']['kernel'].shape == (DIM, 32)
  assert all(params[f'dense{i}']['kernel'].shape == (32 + DIM, 32) for i in range(1, 4))
  assert 'dense4' not in params and params['out']['kernel'].shape == (32 + DIM, DIM)
  params = _init(model)
  assert not np.any(params['out']['kernel']) and not np.any(params['out']['bias'])
  out = _jit(lambda p, x, l: model.apply({'params': p}, x, l))(params, x, jnp.array([-20.0, 0.0, 20.0]))
  assert not np.any(out)
  with pytest.raises(ValueError, match='output_type'):
    jax.eval_shape(_model(output_type='both').init, jax.random.key(0), x, jnp.zeros((3,)))


@pytest.mark.parametrize('loss_type', latent.LATENT_LOSS_TYPES)
def test_latent_loss_types(loss_type):
  model = _model(width=16)
  params = _init(model)
  loss = latent.latent_loss(params, model=model, codes=jax.random.normal(jax.random.key(1), (16, DIM)),
                            rng=jax.random.key(2), loss_type=loss_type)
  assert loss.shape == () and np.isfinite(loss) and float(loss) > 0.0
  with pytest.raises(ValueError, match='loss_type'):
    latent.latent_loss(params, model=model, codes=jnp.zeros((2, DIM)), rng=jax.random.key(2), loss_type='l2')


@pytest.mark.parametrize('output_type', ['v', 'eps'])
def test_latent_loss_decreases_on_a_gaussian_mixture(output_type):
  codes = _mixture(2048, 1)
  stats = latent.latent_statistics(codes)
  normal = latent.normalize(codes, stats)
  model = _model(output_type=output_type)
  params = _init(model)
  opt = optax.adam(1e-3)
  eval_codes = latent.normalize(_mixture(1024, 2), stats)
  evaluate = _jit(lambda p: latent.latent_loss(p, model=model, codes=eval_codes, rng=jax.random.key(9)))

  @_jit
  def train(params):
    def step(carry, i):
      params, opt_state = carry
      batch = normal[jax.random.randint(jax.random.fold_in(jax.random.key(3), i), (128,), 0, normal.shape[0])]
      loss, grads = jax.value_and_grad(latent.latent_loss)(params, model=model, codes=batch,
                                                           rng=jax.random.fold_in(jax.random.key(4), i))
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), curve = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(300))
    return params, curve

  before = float(evaluate(params))
  params, curve = train(params)
  after = float(evaluate(params))
  assert np.all(np.isfinite(curve))
  assert after < 0.6 * before, (before, after)
  assert float(curve[-30:].mean()) < 0.7 * float(curve[:30].mean())

  if output_type != 'v':
    return
  # Samples with v output land about as near the mixture's modes as the data does. (With eps output, PDAE's, the
  # first DDIM step from lambda = -20 divides the eps error by alpha = 4.5e-5: why MLPSkipNet outputs v.)
  samples = _jit(lambda p: latent.sample_latents(p, jax.random.key(7), model=model, num_samples=256, dim=DIM,
                                                 num_steps=50, stats=stats))(params)
  centres = 5.0 + 6.0 * np.random.default_rng(0).normal(size=(4, DIM))
  distance = lambda c: np.median(np.linalg.norm(np.asarray(c)[:, None] - centres[None], axis=-1).min(axis=1))
  assert distance(samples) < 2.0 * distance(codes), (distance(samples), distance(codes))


def test_sample_latents_shapes_determinism_and_statistics():
  codes = _mixture(256, 1)
  stats = latent.latent_statistics(codes)
  model = _model(width=16)
  # Random output weights, so the denoiser is not the zero function of init.
  params = _init(model)
  params = {**params, 'out': {'kernel': 0.1 * jax.random.normal(jax.random.key(5), params['out']['kernel'].shape),
                              'bias': params['out']['bias']}}

  @_jit
  def run(params, rng, num_steps, mean, std):
    s = latent.LatentStats(mean=mean, std=std)
    return (latent.sample_latents(params, rng, model=model, num_samples=5, dim=DIM, num_steps=num_steps, stats=s),
            latent.sample_latents(params, rng, model=model, num_samples=5, dim=DIM, num_steps=num_steps))

  a, a_normal = run(params, jax.random.key(1), 10, stats.mean, stats.std)
  assert a.shape == (5, DIM) and a.dtype == jnp.float32 and np.all(np.isfinite(a))
  np.testing.assert_allclose(a, latent.denormalize(a_normal, stats), rtol=1e-6, atol=1e-6)
  b, _ = run(params, jax.random.key(1), 10, stats.mean, stats.std)
  np.testing.assert_array_equal(a, b)
  c, _ = run(params, jax.random.key(2), 10, stats.mean, stats.std)
  assert not np.allclose(a, c)
  assert len({tuple(np.round(row, 4)) for row in np.asarray(a)}) == 5  # the samples differ from each other too
  d, _ = run(params, jax.random.key(1), 3, stats.mean, stats.std)  # num_steps is traced: same compile
  assert not np.allclose(a, d)


def test_config_entry_point():
  config = ml_collections.ConfigDict(dict(latent.LATENT_DEFAULTS))
  config.lock()
  model = latent.make_latent_model(config)
  assert (model.num_layers, model.width, model.output_type) == (10, 512, 'v')
  assert set(latent.LATENT_KEYS) == set(config.keys())
  for key, value in [('num_layers', 1), ('width', 0), ('num_steps', 0)]:
    with pytest.raises(ValueError, match=f'latent.{key}'):
      latent.make_latent_model({**latent.LATENT_DEFAULTS, key: value})
  with pytest.raises(ValueError, match=r"lacks \['num_steps'\]"):
    latent.make_latent_model(dict(num_layers=4, width=8))
