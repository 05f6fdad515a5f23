"""Attention guidance of the teacher (SFERD.md §3; research/sferd_paper.md §1.4, copied from SAG).

The teacher predicts once and shows which key positions draw more than their share of self-attention; those
"risky" regions of its clipped x prediction are blurred, re-noised with the teacher's own eps and denoised again,
and the guided eps moves away from that degraded prediction: eps_guided = eps_hat + w (eps_hat - eps_b).

Everything here is pure maths on arrays: the teacher is two callables, so the same code guides a U-Net in a
distillation target, a guided DDIM sampler, or a linear toy in the tests. Images are NHWC float32, log-SNR (B,).
Shape-like arguments (image_hw, kernel_size, sigma, padding) are static Python values.
"""

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sferd_jax.diffusion import process
from sferd_jax.models import denoiser
from sferd_jax.models import unet

# 'reflect' mirrors without repeating the edge (d c b | a b c d | c b a): jnp.pad's and torch's 'reflect', which
# torchvision's GaussianBlur (the official code's blur) uses; scipy.ndimage calls it 'mirror'.
# 'symmetric' repeats the edge (c b a | a b c d | d c b): jnp.pad's 'symmetric', scipy.ndimage's 'reflect'.
PADDINGS = ('reflect', 'symmetric')

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], process.Prediction]
DenoiseWithAttentionFn = Callable[[jnp.ndarray, jnp.ndarray], Tuple[process.Prediction, jnp.ndarray]]


def _grid_side(num_tokens):
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ValueError(f'attention has {num_tokens} key tokens, not a square grid')
  return side


def attention_mass(probs):
  """(B, heads, T_query, T_key) attention probabilities -> (B, T_key): the attention each key draws.

  Mean over heads first, then the sum over queries, in the official code's order. Each query row sums to 1, so
  the mean mass over keys is T_query / T_key (1 for self-attention). float32; works under jit.
  """
  chex.assert_rank(probs, 4)
  return jnp.asarray(probs, jnp.float32).mean(axis=1).sum(axis=1)


def risky_mask(attention_probs, *, image_hw: Union[int, Sequence[int]], threshold=1.0):
  """The binary mask (B, H, W, 1) of pixels whose key token draws more than `threshold` attention.

  Args:
    attention_probs: (B, heads, T_query, T_key) softmax probabilities of one self-attention block, over a square
      h x w grid of T_key = h * w tokens.
    image_hw: (H, W) of the image (or one int for a square one); each a multiple of the grid side.
    threshold: each query row sums to 1, so the mean column mass is T_query / T_key = 1 for self-attention and
      1.0 keeps the keys that get more attention than average.

  Returns:
    float32 0/1 of shape (B, H, W, 1), broadcasting over the channels (the official code copies it to each).
  """
  chex.assert_rank(attention_probs, 4)
  batch, _, _, num_keys = attention_probs.shape
  side = _grid_side(num_keys)
  height, width = (image_hw, image_hw) if isinstance(image_hw, int) else tuple(image_hw)
  if height % side or width % side:
    raise ValueError(f'image {height}x{width} is not a multiple of the {side}x{side} attention grid')
  mask = (attention_mass(attention_probs) > threshold).astype(jnp.float32).reshape(batch, side, side)
  # Nearest-neighbour upsampling by an integer factor (F.interpolate's default) is an exact repeat.
  mask = jnp.repeat(jnp.repeat(mask, height // side, axis=1), width // side, axis=2)
  return mask[..., None]


def gaussian_kernel1d(*, kernel_size: int, sigma: float):
  """exp(-k^2 / 2 sigma^2) for k in [-(K-1)/2, (K-1)/2], normalised to sum 1 (torchvision's kernel); numpy."""
  if kernel_size < 1 or kernel_size % 2 != 1:
    raise ValueError(f'kernel_size must be a positive odd int, got {kernel_size}')
  if not sigma > 0:
    raise ValueError(f'sigma must be > 0, got {sigma}')
  k = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
  kernel = np.exp(-0.5 * (k / sigma)**2)
  return (kernel / kernel.sum()).astype(np.float32)


def _blur_axis(x, kernel, *, axis, padding):
  radius = (len(kernel) - 1) // 2
  size = x.shape[axis]
  pad_width = [(0, 0)] * x.ndim
  pad_width[axis] = (radius, radius)
  padded = jnp.pad(x, pad_width, mode=padding)
  # A weighted sum of shifted slices rather than a depthwise conv: exact float32 on every backend (a TPU conv
  # would run in bfloat16 passes at default precision) and cheap at these sizes.
  out = jnp.zeros_like(x)
  for k, w in enumerate(kernel):
    out = out + float(w) * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
  return out


def gaussian_blur(x, *, kernel_size: int = 15, sigma: float = 3.0, padding: str = 'reflect'):
  """Separable Gaussian blur of each channel of NHWC images (torchvision's GaussianBlur(15, 3) by default).

  Where the radius (K-1)/2 is not smaller than an image side (kernel 15 on a 4x4 grid), torchvision raises;
  here the reflection repeats as often as needed (numpy/jnp.pad's rule, the same as scipy.ndimage's), so the full
  kernel is applied to the periodic mirror extension of the image. A side of 1 pads with its only value.
  """
  chex.assert_rank(x, 4)
  if padding not in PADDINGS:
    raise ValueError(f'padding must be one of {PADDINGS}, got {padding!r}')
  kernel = gaussian_kernel1d(kernel_size=kernel_size, sigma=sigma)
  x = _blur_axis(x, kernel, axis=1, padding=padding)
  return _blur_axis(x, kernel, axis=2, padding=padding)


def blur_risky(x, mask, *, kernel_size: int = 15, sigma: float = 3.0, padding: str = 'reflect'):
  """x_bar = mask * blur(x) + (1 - mask) * x: blur only the risky regions."""
  chex.assert_rank([x, mask], 4)
  blurred = gaussian_blur(x, kernel_size=kernel_size, sigma=sigma, padding=padding)
  return mask * blurred + (1.0 - mask) * x


def guided_prediction(*, denoise_with_attention: DenoiseWithAttentionFn, denoise: DenoiseFn, z, logsnr,
                      weight, threshold=1.0, kernel_size: int = 15, sigma: float = 3.0, padding: str = 'reflect',
                      logsnr_range: Optional[Tuple[Optional[float], Optional[float]]] = None):
  """The attention-guided teacher Prediction at (z, logsnr); no gradient flows through it.

  Args:
    denoise_with_attention: pass 1, (z, logsnr) -> (Prediction, attention probs (B, heads, T, T)) of the
      chosen block.
    denoise: pass 2, (z, logsnr) -> Prediction, the same teacher without reading attention.
    z: (B, H, W, C) noisy images.
    logsnr: (B,) their log-SNR.
    weight: guidance weight w (the official code's scale is 1 + w). A Python 0 skips pass 2 entirely and returns
      pass 1's prediction; a traced weight always runs both passes.
    threshold: see risky_mask.
    kernel_size: see gaussian_blur.
    sigma: see gaussian_blur.
    padding: see gaussian_blur.
    logsnr_range: (lo, hi), either end None for unbounded: guide the examples with lo <= logsnr <= hi and give
      the others pass 1's prediction unchanged. None guides everywhere (SFERD's code; SAG guides only t < 0.25).

  Returns:
    Prediction(x, eps, v), consistent at (z, logsnr).
  """
  chex.assert_rank(z, 4)
  chex.assert_shape(logsnr, (z.shape[0],))
  pred, attention_probs = jax.lax.stop_gradient(denoise_with_attention(z, logsnr))
  pred = process.Prediction(*pred)
  if isinstance(weight, (int, float, np.number)) and weight == 0:
    return pred

  # Decision: eps_hat is the model's raw eps (from the unclipped prediction), as in SAG and SFERD's code, which
  # re-noise with and guide the model output; clipping to [-1, 1] only shapes the x that gets blurred. So
  # outside the mask, z_bar = z exactly unless x was clipped there.
  x_hat, eps_hat = pred.x, pred.eps
  mask = risky_mask(attention_probs, image_hw=z.shape[1:3], threshold=threshold)
  x_bar = blur_risky(jnp.clip(x_hat, -1.0, 1.0), mask, kernel_size=kernel_size, sigma=sigma, padding=padding)
  z_bar = process.diffuse(x=x_bar, eps=eps_hat, logsnr=logsnr)
  pred_b = process.Prediction(*jax.lax.stop_gradient(denoise(z_bar, logsnr)))

  eps = eps_hat + weight * (eps_hat - pred_b.eps)
  # x = (z - sigma eps)/alpha, written in x-space: with eps_hat - eps_b = (alpha/sigma)(x_b - x_bar) (both
  # predictions are consistent at their own z, and z_bar = alpha x_bar + sigma eps_hat) it is exactly
  # x_hat + w (x_bar - x_b). This form has no 1/alpha, so it stays accurate in float32 at log-SNR -20 (the first
  # PD step, alpha ~ 5e-5) where (z - sigma eps)/alpha loses ~1e-3 to cancellation; eps keeps its own stable form.
  x = x_hat + weight * (x_bar - pred_b.x)
  guided = process.Prediction(x=x, eps=eps, v=process.v_from_x_eps(x=x, eps=eps, logsnr=logsnr))

  if logsnr_range is None:
    return guided
  lo, hi = logsnr_range
  inside = jnp.ones(logsnr.shape, bool)
  if lo is not None:
    inside &= logsnr >= lo
  if hi is not None:
    inside &= logsnr <= hi
  inside = inside[:, None, None, None]
  return process.Prediction(*(jnp.where(inside, g, p) for g, p in zip(guided, pred)))


GUIDANCE_KEYS = ('enabled', 'block', 'threshold', 'kernel_size', 'sigma', 'weight', 'padding', 'logsnr_min',
                 'logsnr_max')


def from_config(cfg: Mapping[str, Any]):
  """A guidance config section -> keyword arguments of guided_prediction (all but the callables, z, logsnr).

  Keys: enabled (False = weight 0, the plain teacher), block (which attention block sows its probabilities: the
  model wiring reads it, not this module), threshold, kernel_size, sigma, weight, padding ('reflect' or
  'symmetric'), logsnr_min / logsnr_max (None = unbounded on that side; both None = guide everywhere).
  """
  lo, hi = cfg['logsnr_min'], cfg['logsnr_max']
  return dict(
      weight=float(cfg['weight']) if cfg['enabled'] else 0.0,
      threshold=float(cfg['threshold']),
      kernel_size=int(cfg['kernel_size']),
      sigma=float(cfg['sigma']),
      padding=str(cfg['padding']),
      logsnr_range=None if lo is None and hi is None else (lo, hi),
  )


def is_active(cfg):
  """Guidance changes the prediction only when enabled with a nonzero weight."""
  return bool(cfg['enabled']) and float(cfg['weight']) != 0.0


def guidance_block(model_config, cfg):
  """The attention block whose map drives guidance: cfg.block, or the decoder's highest-resolution one."""
  return cfg['block'] or unet.default_guidance_block(model_config)


def denoise_factory(model_config, cfg):
  """(params, labels) -> denoise_fn(z, logsnr) -> Prediction: the attention-guided model when cfg is active,
  else the plain one (exactly: one forward pass, fused attention everywhere).

  Only the guidance block materialises its attention probabilities, in pass 1; pass 2 and every other block
  keep the fused attention path.
  """
  output_type = model_config['output_type']
  plain = unet.make_unet(model_config)
  if cfg is None or not is_active(cfg):
    return lambda params, labels: (
        lambda z, logsnr: denoiser.denoise(plain, params, z, logsnr, labels, output_type=output_type))
  block = guidance_block(model_config, cfg)
  capturing = unet.make_unet(model_config, capture_attention=(block,))
  kwargs = from_config(cfg)

  def make(params, labels):
    def denoise_fn(z, logsnr):
      return guided_prediction(
          denoise_with_attention=lambda z_, l_: denoiser.denoise_with_attention(
              capturing, params, z_, l_, labels, output_type=output_type, block=block),
          denoise=lambda z_, l_: denoiser.denoise(plain, params, z_, l_, labels, output_type=output_type),
          z=z, logsnr=logsnr, **kwargs)
    return denoise_fn

  return make


def validate_config(cfg, model_config):
  """Raises ValueError naming the key for a guidance section that cannot work with this model."""
  names = [b.name for b in unet.attention_blocks(model_config)]
  if cfg['block'] is not None and cfg['block'] not in names:
    raise ValueError(f"block={cfg['block']!r} is not an attention block of this model; its blocks are {names}")
  if cfg['kernel_size'] < 1 or cfg['kernel_size'] % 2 != 1:
    raise ValueError(f"kernel_size must be a positive odd int, got {cfg['kernel_size']}")
  if not cfg['sigma'] > 0:
    raise ValueError(f"sigma must be > 0, got {cfg['sigma']}")
  if cfg['weight'] < 0:
    raise ValueError(f"weight must be >= 0 (0 = the plain teacher), got {cfg['weight']}")
  if cfg['padding'] not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}, got {cfg['padding']!r}")
  lo, hi = cfg['logsnr_min'], cfg['logsnr_max']
  if lo is not None and hi is not None and lo > hi:
    raise ValueError(f'logsnr_min ({lo}) must not exceed logsnr_max ({hi})')
