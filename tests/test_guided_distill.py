"""Attention guidance wired into the distillation target, the distill step and sample() (issue: guidance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax.diffusion import distillation
from sferd_jax.diffusion import schedules
from sferd_jax import errors
from sferd_jax.models import denoiser
from sferd_jax.models import unet
from sferd_jax import sampling
from sferd_jax.sferd import guided_teacher
from sferd_jax.training import phases
import tiny


def _guided_config(**overrides):
  return tiny.load_config(**{'sferd.attention_guidance.enabled': True, **overrides})


@pytest.fixture(scope='module')
def params():
  config = tiny.load_config()
  model = unet.make_unet(config.model)
  init = jax.jit(lambda rng: unet.init_params(model, rng, model_config=config.model))(jax.random.key(0))
  # Perturb the zero-initialised output layer so the teacher predicts something non-trivial.
  leaves, treedef = jax.tree.flatten(init)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _inputs(config, batch=4):
  z = jax.random.normal(jax.random.key(2), (batch, 8, 8, 1))
  i = jnp.array([0, 1, 2, 3])[:batch]
  return z, i


def _count_applies(monkeypatch):
  counts = {'plain': 0, 'attention': 0}
  plain, attention = denoiser.denoise, denoiser.denoise_with_attention

  def counted_plain(*a, **k):
    counts['plain'] += 1
    return plain(*a, **k)

  def counted_attention(*a, **k):
    counts['attention'] += 1
    return attention(*a, **k)
  monkeypatch.setattr(denoiser, 'denoise', counted_plain)
  monkeypatch.setattr(denoiser, 'denoise_with_attention', counted_attention)
  return counts


def _target(config, params, guidance):
  z, i = _inputs(config)
  teacher = guided_teacher.denoise_factory(config.model, guidance)(params, None)
  return distillation.student_target(teacher_fn=teacher, z=z, i=i, num_steps=4,
                                     logsnr_fn=schedules.cosine_logsnr)


def test_weight_zero_is_exactly_the_plain_teacher_with_one_pass(params, monkeypatch):
  config = _guided_config(**{'sferd.attention_guidance.weight': 0.0})
  counts = _count_applies(monkeypatch)
  zero = _target(config, params, config.sferd.attention_guidance)
  assert counts == {'plain': 2, 'attention': 0}  # two teacher evaluations (two DDIM steps), one pass each
  plain = _target(config, params, None)
  for a, b in zip(zero, plain):
    np.testing.assert_array_equal(a, b)


def test_guided_teacher_runs_two_passes_and_changes_the_target(params, monkeypatch):
  config = _guided_config()
  counts = _count_applies(monkeypatch)
  guided = _target(config, params, config.sferd.attention_guidance)
  assert counts == {'plain': 2, 'attention': 2}
  plain = _target(config, params, None)
  assert not np.allclose(guided.x, plain.x, atol=1e-4)
  assert np.all(np.isfinite(guided.x))


def test_no_gradient_reaches_the_teacher(params):
  config = _guided_config()
  grads = jax.grad(lambda p: jnp.sum(_target(config, p, config.sferd.attention_guidance).x))(params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_guided_distill_step_sharded_equals_single_device(params):
  config = _guided_config()
  spec = phases.build(config, 'distill')  # the guided teacher: the config's guidance is on
  batch = phases.make_batches(config, spec).get(0, 1)
  (one, m1), (four, m4) = (tiny.run_step_on(devices, spec.step, lambda: spec.init(params), batch,
                                            (params, np.int32(2)))
                           for devices in (jax.devices()[:1], jax.devices()))
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['grad_norm'], m4['grad_norm'], rtol=1e-4)
  # Adam's first update is ~lr * sign(g): a near-zero gradient's summation-order noise can flip a whole step of
  # size lr = 1e-4, so parameters agree to a fraction of one step, not to float epsilon.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5), one.params, four.params)


def test_guided_sampling_through_sample(params):
  config = _guided_config()
  kwargs = dict(model_config=config.model, num_samples=4, num_steps=3)
  plain = sampling.sample(params, jax.random.key(0), **kwargs)
  guided = sampling.sample(params, jax.random.key(0), guidance=config.sferd.attention_guidance, **kwargs)
  again = sampling.sample(params, jax.random.key(0), guidance=config.sferd.attention_guidance, **kwargs)
  np.testing.assert_array_equal(guided, again)
  assert not np.array_equal(plain, guided)
  off = sampling.sample(params, jax.random.key(0), guidance=tiny.load_config().sferd.attention_guidance, **kwargs)
  np.testing.assert_array_equal(plain, off)  # a disabled section is the plain sampler


def test_guidance_config_is_validated():
  config_lib.validate(_guided_config(**{'sferd.attention_guidance.block': 'dec4_1_attn'}))
  for key, value, message in (('block', 'dec16_0_attn', 'not an attention block'),
                              ('kernel_size', 4, 'odd'), ('weight', -1.0, 'weight'), ('padding', 'zeros', 'padding'),
                              ('sigma', 0.0, 'sigma')):
    with pytest.raises(errors.ConfigError, match=message):
      config_lib.validate(_guided_config(**{f'sferd.attention_guidance.{key}': value}))
  assert guided_teacher.guidance_block(tiny.load_config().model, tiny.load_config().sferd.attention_guidance) \
      == unet.default_guidance_block(tiny.load_config().model)
