"""The latent diffusion over semantic codes: statistics, the MLPSkipNet denoiser, its loss and its sampler."""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sferd_jax import config as config_lib
from sferd_jax.data import codes as codes_lib
from sferd_jax.models import latent
from sferd_jax.models import layers
from sferd_jax.training import state as state_lib
from sferd_jax.training import steps as steps_lib

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


class _UnconditionalMLPSkipNet(nn.Module):
  """MLPSkipNet as it was before num_classes (verbatim): the reference that num_classes=0 must still equal."""
  num_layers: int = 10
  width: int = 512
  time_emb_dim: int = 64
  output_type: str = 'v'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, logsnr):
    batch, dim = x.shape
    chex.assert_shape(logsnr, (batch,))
    dtype = jnp.dtype(self.dtype)
    dense = lambda features, name, **kw: nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name, **kw)
    emb = layers.timestep_embedding(layers.inv_cos(logsnr), dim=self.time_emb_dim)
    emb = nn.swish(dense(self.width, 'time_dense1')(nn.swish(dense(self.width, 'time_dense0')(emb))))
    x = x.astype(dtype)
    h = x
    for i in range(self.num_layers - 1):
      if i > 0:
        h = jnp.concatenate([h, x], axis=-1)
      h = dense(self.width, f'dense{i}')(h)
      h = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name=f'norm{i}')(h.astype(jnp.float32))
      scale, shift = jnp.split(dense(2 * self.width, f'film{i}')(emb).astype(jnp.float32), 2, axis=-1)
      h = nn.swish(h * (1 + scale) + shift).astype(dtype)
    out = dense(dim, 'out', kernel_init=nn.initializers.zeros)(jnp.concatenate([h, x], axis=-1))
    return out.astype(jnp.float32)


def _random_out(params, seed=5):
  """params with random output weights, so that the denoiser is not the zero function of init."""
  kernel = 0.1 * jax.random.normal(jax.random.key(seed), params['out']['kernel'].shape)
  return {**params, 'out': {'kernel': kernel, 'bias': params['out']['bias']}}


def test_unconditional_model_is_unchanged_by_num_classes():
  """num_classes=0: the parameter tree (names, shapes, init values) and outputs of the model before num_classes,
  so that its exports still load; a conditional model adds only 'class_emb'."""
  config = dict(num_layers=4, width=32, num_steps=10)
  model = latent.make_latent_model(config)
  assert model.num_classes == 0
  legacy = _UnconditionalMLPSkipNet(num_layers=4, width=32)
  params = _init(model)
  legacy_params = _jit(lambda key: legacy.init(key, jnp.zeros((1, DIM)), jnp.zeros((1,)))['params'])(
      jax.random.key(0))
  chex.assert_trees_all_equal(params, legacy_params)  # the same keys, shapes and values
  params = _random_out(params)
  x, logsnr = jax.random.normal(jax.random.key(1), (6, DIM)), jnp.linspace(-20.0, 20.0, 6)
  out = _jit(lambda p: model.apply({'params': p}, x, logsnr))(params)
  np.testing.assert_array_equal(out, _jit(lambda p: legacy.apply({'params': p}, x, logsnr))(params))
  assert np.any(out)
  # The loss and the sampler, labels=None by default, are the unconditional ones.
  np.testing.assert_array_equal(latent.denoise(model, params, x, logsnr).v,
                                latent.denoise(model, params, x, logsnr, labels=None).v)

  conditional = latent.make_latent_model(config, num_classes=3)
  cond_params = _init(conditional)
  assert set(cond_params) == set(params) | {'class_emb'}
  assert cond_params['class_emb']['embedding'].shape == (3, 32)
  chex.assert_trees_all_equal_shapes({k: v for k, v in cond_params.items() if k != 'class_emb'}, params)


def test_conditional_output_depends_on_the_label():
  model = _model(width=32, num_classes=3)
  params = _random_out(_init(model))
  x, logsnr = jax.random.normal(jax.random.key(1), (4, DIM)), jnp.array([-5.0, 0.0, 2.0, 8.0])
  apply = _jit(lambda p, labels: model.apply({'params': p}, x, logsnr, labels))
  a = apply(params, jnp.zeros((4,), jnp.int32))
  b = apply(params, jnp.array([1, 2, 1, 2], jnp.int32))
  assert a.shape == (4, DIM) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  assert np.all(np.abs(np.asarray(a) - np.asarray(b)).max(axis=-1) > 1e-4)  # every row changes with its label
  np.testing.assert_array_equal(a, apply(params, jnp.zeros((4,), jnp.int32)))
  # Per sample: a row's output depends on its own label only.
  mixed = apply(params, jnp.array([0, 0, 1, 2], jnp.int32))
  np.testing.assert_allclose(mixed[:2], a[:2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mixed[2:], b[2:], rtol=1e-6, atol=1e-6)
  # The loss and the sampler take labels too, traced under jit.
  loss = _jit(lambda p, labels: latent.latent_loss(p, model=model, codes=x, rng=jax.random.key(2), labels=labels))
  assert float(loss(params, jnp.zeros((4,), jnp.int32))) != float(loss(params, jnp.full((4,), 2, jnp.int32)))
  sample = _jit(lambda p, labels: latent.sample_latents(p, jax.random.key(3), model=model, num_samples=4, dim=DIM,
                                                        num_steps=5, labels=labels))
  assert not np.allclose(sample(params, jnp.zeros((4,), jnp.int32)), sample(params, jnp.ones((4,), jnp.int32)))


def test_missing_or_unexpected_labels_raise():
  x, logsnr = jnp.zeros((2, DIM)), jnp.zeros((2,))
  conditional, unconditional = _model(width=8, num_classes=2), _model(width=8)
  with pytest.raises(ValueError, match='class-conditional'):
    jax.eval_shape(conditional.init, jax.random.key(0), x, logsnr)
  with pytest.raises(ValueError, match='unconditional'):
    jax.eval_shape(unconditional.init, jax.random.key(0), x, logsnr, jnp.zeros((2,), jnp.int32))
  params, cond_params = _init(unconditional), _init(conditional)
  with pytest.raises(ValueError, match='class-conditional'):
    latent.latent_loss(cond_params, model=conditional, codes=x, rng=jax.random.key(1))
  with pytest.raises(ValueError, match='unconditional'):
    latent.latent_loss(params, model=unconditional, codes=x, rng=jax.random.key(1), labels=jnp.zeros((2,), int))
  with pytest.raises(ValueError, match='class-conditional'):
    latent.sample_latents(cond_params, jax.random.key(1), model=conditional, num_samples=2, dim=DIM, num_steps=2)
  with pytest.raises(AssertionError):  # chex: labels of the wrong shape
    latent.sample_latents(cond_params, jax.random.key(1), model=conditional, num_samples=2, dim=DIM, num_steps=2,
                          labels=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match='num_classes'):
    latent.make_latent_model(latent.LATENT_DEFAULTS, num_classes=-1)


def test_code_batches_carry_labels():
  codes = np.arange(40, dtype=np.float32).reshape(20, 2)
  labels = np.arange(20) % 3
  batch = codes_lib.CodeBatches(codes, global_batch_size=4, seed=0, labels=labels).get(3, num_steps=2)
  assert batch['image'].shape == (2, 4, 2) and batch['label'].shape == (2, 4) and batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['label'], labels[(batch['image'][..., 0] / 2).astype(int)])  # row i: 2i
  unlabelled = codes_lib.CodeBatches(codes, global_batch_size=4, seed=0).get(3, num_steps=2)
  np.testing.assert_array_equal(unlabelled['image'], batch['image'])
  assert not np.any(unlabelled['label'])
  with pytest.raises(ValueError, match='labels'):
    codes_lib.CodeBatches(codes, global_batch_size=4, seed=0, labels=labels[:5])


def test_conditional_training_samples_each_class():
  """Two classes of 4-D codes centred at +3 and -3 on axis 0 (statistics over both): after training through the
  latent phase's CodeBatches and make_latent_step, codes sampled with label 0 land at +3 and with label 1 at -3."""
  n, dim, num_steps = 1024, 4, 300
  rng = np.random.default_rng(0)
  labels = np.arange(n) % 2
  codes = 0.5 * rng.normal(size=(n, dim)) + 1.0
  codes[:, 0] += np.where(labels == 0, 3.0, -3.0)
  stats = latent.latent_statistics(codes)  # over all codes: class 0's mean is not 0 after normalising
  batches = codes_lib.CodeBatches(np.asarray(latent.normalize(codes, stats)), global_batch_size=128, seed=0,
                                 labels=labels).get(0, num_steps)
  model = latent.make_latent_model(dict(num_layers=3, width=64, num_steps=20), num_classes=2)
  train_config = config_lib.training_config(train_steps=num_steps, batch_size=128, learning_rate=3e-3,
                                            loss='eps_mse')
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, train_config.train_steps)
  step = steps_lib.make_latent_step(model=model, diffusion_config={}, train_config=train_config, tx=tx,
                                    schedule=schedule)

  @_jit
  def train(key):
    state = state_lib.TrainState.create(params=latent.init_latent_params(model, key, dim=dim), tx=tx, ema_decay=0.0)
    return jax.lax.scan(lambda s, b: step(s, b, jax.random.key(1)), state, batches)

  state, metrics = train(jax.random.key(0))
  assert np.all(np.isfinite(metrics['loss']))
  assert float(metrics['loss'][-50:].mean()) < float(metrics['loss'][:50].mean())

  sample = _jit(lambda p, labels: latent.sample_latents(p, jax.random.key(7), model=model, num_samples=256,
                                                        dim=dim, num_steps=20, stats=stats, labels=labels))
  for label, centre in [(0, 3.0), (1, -3.0)]:
    samples = np.asarray(sample(state.params, jnp.full((256,), label, jnp.int32)))
    assert abs(samples[:, 0].mean() - (centre + 1.0)) < 0.5, (label, samples[:, 0].mean())
    assert np.mean(np.sign(samples[:, 0] - 1.0) == np.sign(centre)) > 0.95, label  # on the class's side
    assert 0.3 < samples[:, 0].std() < 0.8, (label, samples[:, 0].std())  # one mode of std 0.5, not both
    np.testing.assert_allclose(samples[:, 1:].mean(axis=0), 1.0, atol=0.4)
