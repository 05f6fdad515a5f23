"""Attention guidance: the risky mask, the Gaussian blur (against scipy) and the guided teacher on a linear toy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from sferd_jax.diffusion import process
from sferd_jax.diffusion import schedules
from sferd_jax.sferd import guided_teacher as ag

# ---------------------------------------------------------------------------------------------------------------
# risky_mask


def _one_hot_attention(batch, heads, side, keys):
  """Every query of head h in example b attends only key keys[b][h]."""
  t = side * side
  attn = np.zeros((batch, heads, t, t), np.float32)
  for b in range(batch):
    for h in range(heads):
      attn[b, h, :, keys[b][h]] = 1.0
  return attn


def _block(side, key, image_hw):
  """The expected (H, W) 0/1 mask of one grid cell, upsampled."""
  h, w = image_hw
  cell = np.zeros((side, side), np.float32)
  cell[key // side, key % side] = 1.0
  return np.repeat(np.repeat(cell, h // side, axis=0), w // side, axis=1)


def test_uniform_attention_gives_an_empty_mask_and_the_threshold_is_strict():
  t = 16  # 1/16 is exact, so every column mass is exactly 1.0: the boundary itself
  attn = jnp.full((2, 4, t, t), 1.0 / t, jnp.float32)
  mask = ag.risky_mask(attn, image_hw=(8, 8))
  assert mask.shape == (2, 8, 8, 1) and mask.dtype == jnp.float32
  np.testing.assert_array_equal(mask, 0.0)
  np.testing.assert_array_equal(ag.risky_mask(attn, image_hw=(8, 8), threshold=0.999), 1.0)


@pytest.mark.parametrize('image_hw', [(16, 16), (32, 24), (4, 4)])
def test_one_hot_columns_mark_exactly_that_block(image_hw):
  side = 4
  keys = [[5, 5, 5], [0, 0, 0], [15, 15, 15]]  # different key per example, the same in every head
  mask = np.asarray(ag.risky_mask(jnp.asarray(_one_hot_attention(3, 3, side, keys)), image_hw=image_hw))
  assert mask.shape == (3,) + image_hw + (1,)
  for b in range(3):
    np.testing.assert_array_equal(mask[b, ..., 0], _block(side, keys[b][0], image_hw))
  # It broadcasts over all channels of an image.
  x = np.ones((3,) + image_hw + (3,), np.float32)
  for c in range(3):
    np.testing.assert_array_equal((mask * x)[..., c], mask[..., 0])


def test_different_keys_per_head_each_get_half_the_mass():
  side, t = 4, 16
  attn = _one_hot_attention(2, 2, side, [[3, 9], [7, 7]])
  mass = attn.mean(axis=1).sum(axis=1)
  assert mass[0, 3] == mass[0, 9] == t / 2 and mass[1, 7] == t
  mask = np.asarray(ag.risky_mask(jnp.asarray(attn), image_hw=8))
  np.testing.assert_array_equal(mask[0, ..., 0], _block(side, 3, (8, 8)) + _block(side, 9, (8, 8)))
  np.testing.assert_array_equal(mask[1, ..., 0], _block(side, 7, (8, 8)))


def test_mean_over_heads_arithmetic():
  side, t, k = 4, 16, 6
  attn = np.zeros((1, 2, t, t), np.float32)
  attn[0, 0, :, k] = 1.0  # head 0 attends key k only
  attn[0, 1] = 1.0 / t  # head 1 is uniform
  # Column k: mean (1 + 1/16)/2 = 0.53125 summed over 16 queries = 8.5; the others 0.5. All exact in float32.
  attn = jnp.asarray(attn)
  expected = _block(side, k, (8, 8))
  np.testing.assert_array_equal(ag.risky_mask(attn, image_hw=8)[0, ..., 0], expected)
  np.testing.assert_array_equal(ag.risky_mask(attn, image_hw=8, threshold=8.4)[0, ..., 0], expected)
  np.testing.assert_array_equal(ag.risky_mask(attn, image_hw=8, threshold=8.5), 0.0)
  np.testing.assert_array_equal(ag.risky_mask(attn, image_hw=8, threshold=0.49), 1.0)


def test_mask_errors():
  with pytest.raises(ValueError, match='square'):
    ag.risky_mask(jnp.zeros((1, 1, 15, 15)), image_hw=(15, 15))
  with pytest.raises(ValueError, match='multiple'):
    ag.risky_mask(jnp.zeros((1, 1, 16, 16)), image_hw=(10, 8))


# ---------------------------------------------------------------------------------------------------------------
# Gaussian blur

# Our padding name -> scipy.ndimage's name for the same extension.
SCIPY_MODE = {'reflect': 'mirror', 'symmetric': 'reflect'}


def _scipy_blur(x, *, kernel_size, sigma, padding):
  radius = (kernel_size - 1) // 2
  return ndimage.gaussian_filter(np.asarray(x, np.float64), sigma=(0, sigma, sigma, 0), mode=SCIPY_MODE[padding],
                                 truncate=radius / sigma)


@pytest.mark.parametrize('padding', ['reflect', 'symmetric'])
@pytest.mark.parametrize('hw', [(16, 16), (32, 24), (4, 4), (1, 7)])
@pytest.mark.parametrize('kernel_size,sigma', [(15, 3.0), (5, 1.0)])
def test_blur_matches_scipy(padding, hw, kernel_size, sigma):
  # (4, 4) and (1, 7) with kernel 15: the pad exceeds the image and the reflection repeats, as in scipy.
  x = np.random.default_rng(0).uniform(-1, 1, (2,) + hw + (3,)).astype(np.float32)
  got = ag.gaussian_blur(jnp.asarray(x), kernel_size=kernel_size, sigma=sigma, padding=padding)
  np.testing.assert_allclose(got, _scipy_blur(x, kernel_size=kernel_size, sigma=sigma, padding=padding), atol=1e-5)


def test_blur_padding_names_differ_and_jit_agrees():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 2)), jnp.float32)
  reflect = ag.gaussian_blur(x, kernel_size=5, sigma=1.0, padding='reflect')
  assert not np.allclose(reflect, ag.gaussian_blur(x, kernel_size=5, sigma=1.0, padding='symmetric'))
  jitted = jax.jit(lambda y: ag.gaussian_blur(y, kernel_size=5, sigma=1.0))(x)
  np.testing.assert_allclose(jitted, reflect, atol=1e-6)


def test_kernel_sums_to_one_and_constant_images_stay():
  for k, s in [(15, 3.0), (5, 1.0), (1, 0.5), (31, 9.0)]:
    kernel = ag.gaussian_kernel1d(kernel_size=k, sigma=s)
    assert kernel.shape == (k,)
    np.testing.assert_allclose(kernel.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernel, kernel[::-1])
  x = jnp.full((2, 16, 12, 3), 0.37, jnp.float32)
  for padding in ag.PADDINGS:
    np.testing.assert_allclose(ag.gaussian_blur(x, padding=padding), x, atol=1e-6)


def test_blur_errors():
  with pytest.raises(ValueError, match='odd'):
    ag.gaussian_kernel1d(kernel_size=4, sigma=1.0)
  with pytest.raises(ValueError, match='sigma'):
    ag.gaussian_kernel1d(kernel_size=5, sigma=0.0)
  with pytest.raises(ValueError, match='padding'):
    ag.gaussian_blur(jnp.zeros((1, 4, 4, 1)), padding='mirror')


def test_blur_risky_mixes_by_mask():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 3)), jnp.float32)
  blurred = ag.gaussian_blur(x, kernel_size=5, sigma=1.0)
  kwargs = dict(kernel_size=5, sigma=1.0, padding='reflect')
  np.testing.assert_array_equal(ag.blur_risky(x, jnp.zeros((2, 8, 8, 1)), **kwargs), x)
  np.testing.assert_array_equal(ag.blur_risky(x, jnp.ones((2, 8, 8, 1)), **kwargs), blurred)
  mask = jnp.zeros((2, 8, 8, 1)).at[:, :4].set(1.0)
  mixed = ag.blur_risky(x, mask, **kwargs)
  np.testing.assert_array_equal(mixed[:, :4], blurred[:, :4])
  np.testing.assert_array_equal(mixed[:, 4:], x[:, 4:])


# ---------------------------------------------------------------------------------------------------------------
# guided_prediction on a linear toy teacher: x_hat = a z, with a fixed attention map.

SIDE, HW, CH = 4, 16, 3
KEYS = [[5, 5], [10, 10], [0, 15]]  # example 2: two keys, one per head
BLUR = dict(kernel_size=5, sigma=1.0, padding='reflect')


class Toy:
  """A consistent x-prediction teacher that counts its passes (at trace time under jit)."""

  def __init__(self):
    self.calls = {'attention': 0, 'plain': 0}

  def passes(self, params):
    attn = jnp.asarray(_one_hot_attention(3, 2, SIDE, KEYS)) * params['c']  # c = 1; lets grad see the map too

    def denoise_with_attention(z, logsnr):
      self.calls['attention'] += 1
      return process.from_x(x=params['a'] * z, z=z, logsnr=logsnr), attn

    def denoise(z, logsnr):
      self.calls['plain'] += 1
      return process.from_x(x=params['a'] * z, z=z, logsnr=logsnr)

    return dict(denoise_with_attention=denoise_with_attention, denoise=denoise)


PARAMS = {'a': jnp.float32(0.9), 'c': jnp.float32(1.0)}


def _inputs(logsnr=(-2.0, 0.5, 3.0), seed=3):
  z = np.random.default_rng(seed).normal(size=(3, HW, HW, CH)).astype(np.float32) * 1.5
  return jnp.asarray(z), jnp.asarray(logsnr, jnp.float32)


def _hand_guided(z, logsnr, *, a, weight, eps_from_clipped=False):
  """SFERD.md §3 step by step, in float64 with scipy's blur and a hand-built mask."""
  z, logsnr = np.asarray(z, np.float64), np.asarray(logsnr, np.float64)
  alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None]
  sigma = np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None]
  x_hat = a * z
  x_clip = np.clip(x_hat, -1, 1)
  eps_hat = (z - alpha * (x_clip if eps_from_clipped else x_hat)) / sigma
  mask = np.stack([sum(_block(SIDE, k, (HW, HW)) for k in set(keys)) for keys in KEYS])[..., None]
  x_bar = mask * _scipy_blur(x_clip, kernel_size=5, sigma=1.0, padding='reflect') + (1 - mask) * x_clip
  z_bar = alpha * x_bar + sigma * eps_hat
  eps_b = (z_bar - alpha * (a * z_bar)) / sigma
  eps = eps_hat + weight * (eps_hat - eps_b)
  x = (z - sigma * eps) / alpha
  return x, eps, alpha * eps - sigma * x


def _pass1(z, logsnr):
  return process.from_x(x=PARAMS['a'] * z, z=z, logsnr=logsnr)


@pytest.mark.parametrize('use_jit', [False, True])
def test_weight_zero_is_pass_one_and_skips_pass_two(use_jit):
  toy, (z, logsnr) = Toy(), _inputs()

  passes = toy.passes(PARAMS)
  seen = {}

  def pass1(z, logsnr):
    seen['pred'], attn = passes['denoise_with_attention'](z, logsnr)
    return seen['pred'], attn

  def guided(z, logsnr):
    # Returns pass 1's own output too: jit may fuse the toy differently from eager, so compare within one run.
    return ag.guided_prediction(denoise_with_attention=pass1, denoise=passes['denoise'], z=z, logsnr=logsnr,
                                weight=0.0, **BLUR), seen['pred']

  out, want = (jax.jit(guided) if use_jit else guided)(z, logsnr)
  assert toy.calls == {'attention': 1, 'plain': 0}
  for got, w in zip(out, want):
    np.testing.assert_array_equal(got, w)
  for got, w in zip(out, _pass1(z, logsnr)):
    np.testing.assert_allclose(got, w, atol=1e-5)


@pytest.mark.parametrize('use_jit', [False, True])
def test_guided_matches_the_hand_computation(use_jit):
  toy, (z, logsnr) = Toy(), _inputs()
  assert np.any(np.abs(0.9 * np.asarray(z)) > 1), 'the toy must exercise the clipping'

  def guided(z, logsnr):
    return ag.guided_prediction(**toy.passes(PARAMS), z=z, logsnr=logsnr, weight=0.3, **BLUR)

  out = (jax.jit(guided) if use_jit else guided)(z, logsnr)
  assert toy.calls == {'attention': 1, 'plain': 1}
  want = _hand_guided(z, logsnr, a=0.9, weight=0.3)
  for got, w in zip(out, want):
    np.testing.assert_allclose(got, w, atol=2e-5, rtol=1e-5)
  # The choice of eps_hat is visible: re-noising with the eps of the clipped x would give another answer.
  other = _hand_guided(z, logsnr, a=0.9, weight=0.3, eps_from_clipped=True)
  assert np.abs(np.asarray(out.eps) - other[1]).max() > 1e-2
  # And guidance does something.
  assert np.abs(np.asarray(out.eps) - np.asarray(_pass1(z, logsnr).eps)).max() > 1e-2


def test_traced_weight_runs_both_passes():
  toy, (z, logsnr) = Toy(), _inputs()
  fn = jax.jit(lambda w: ag.guided_prediction(**toy.passes(PARAMS), z=z, logsnr=logsnr, weight=w, **BLUR))
  out = fn(jnp.float32(0.3))
  assert toy.calls == {'attention': 1, 'plain': 1}
  np.testing.assert_allclose(out.eps, _hand_guided(z, logsnr, a=0.9, weight=0.3)[1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('logsnr_range,inside', [((-1.0, 1.0), [False, True, False]),
                                                 ((None, 1.0), [True, True, False]),
                                                 ((0.5, None), [False, True, True]),
                                                 ((5.0, 6.0), [False, False, False])])
def test_logsnr_range(logsnr_range, inside):
  toy, (z, logsnr) = Toy(), _inputs()  # logsnr = (-2, 0.5, 3); the ends of the range are inclusive
  out = ag.guided_prediction(**toy.passes(PARAMS), z=z, logsnr=logsnr, weight=0.3, logsnr_range=logsnr_range,
                             **BLUR)
  full = ag.guided_prediction(**toy.passes(PARAMS), z=z, logsnr=logsnr, weight=0.3, **BLUR)
  for got, guided, plain in zip(out, full, _pass1(z, logsnr)):
    for b, guide in enumerate(inside):
      np.testing.assert_array_equal(got[b], guided[b] if guide else plain[b])


@pytest.mark.parametrize('weight', [0.0, 0.3])
def test_no_gradient_flows_through_the_teacher(weight):
  z, logsnr = _inputs()

  def loss(params):
    pred = ag.guided_prediction(**Toy().passes(params), z=z, logsnr=logsnr, weight=weight, **BLUR)
    return sum(jnp.sum(p**2) for p in pred)

  grads = jax.grad(loss)(PARAMS)
  assert float(grads['a']) == 0.0 and float(grads['c']) == 0.0


def test_prediction_is_self_consistent():
  z, logsnr = _inputs(logsnr=(-4.0, 0.0, 4.0))
  pred = ag.guided_prediction(**Toy().passes(PARAMS), z=z, logsnr=logsnr, weight=0.5, **BLUR)
  np.testing.assert_allclose(pred.x, process.x_from_eps(z=z, eps=pred.eps, logsnr=logsnr), atol=1e-4)
  np.testing.assert_allclose(pred.v, process.v_from_x_eps(x=pred.x, eps=pred.eps, logsnr=logsnr), atol=1e-6)
  np.testing.assert_allclose(pred.eps, process.eps_from_v(z=z, v=pred.v, logsnr=logsnr), atol=1e-4)


def test_guided_x_is_accurate_at_high_noise():
  # lambda = -20 (alpha ~ 5e-5) is the first teacher step of every PD target; x must not lose digits there.
  logsnr = (schedules.LOGSNR_MIN, -15.0, -10.0)
  z, logsnr = _inputs(logsnr=logsnr)
  pred = ag.guided_prediction(**Toy().passes(PARAMS), z=z, logsnr=logsnr, weight=0.3, **BLUR)
  want_x, want_eps, _ = _hand_guided(z, logsnr, a=0.9, weight=0.3)
  np.testing.assert_allclose(pred.x, want_x, atol=1e-5)
  np.testing.assert_allclose(pred.eps, want_eps, atol=1e-5)


def test_from_config():
  cfg = dict(enabled=True, block='dec_32', threshold=1.0, kernel_size=15, sigma=3.0, weight=0.3, padding='reflect',
             logsnr_min=None, logsnr_max=None)
  assert set(cfg) == set(ag.GUIDANCE_KEYS)
  kwargs = ag.from_config(cfg)
  assert kwargs == dict(weight=0.3, threshold=1.0, kernel_size=15, sigma=3.0, padding='reflect', logsnr_range=None)
  assert ag.from_config({**cfg, 'enabled': False})['weight'] == 0.0
  assert ag.from_config({**cfg, 'logsnr_max': 2.0})['logsnr_range'] == (None, 2.0)
  # The keyword arguments plug straight in.
  toy, (z, logsnr) = Toy(), _inputs()
  ag.guided_prediction(**toy.passes(PARAMS), z=z, logsnr=logsnr, **ag.from_config({**cfg, 'enabled': False}))
  assert toy.calls['plain'] == 0
