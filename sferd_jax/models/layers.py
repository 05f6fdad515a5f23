"""Building blocks of the U-Net, following progressive distillation's unet.py (google-research).

Parameter names inside a block (norm1, conv1, temb_proj, norm2, conv2, nin_shortcut; norm, q, k, v, proj_out)
are PD's, so a converter for PD's public checkpoints only has to rename the blocks themselves.
Parameters are float32; `dtype` is the compute dtype; GroupNorm statistics and attention softmax are float32.
"""

import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_COLLECTION = 'intermediates'
ATTENTION_KEY = 'attention_probs'


def num_groups(channels):
  """GroupNorm groups for `channels`: PD's 32, fewer for narrow test nets. Must divide channels."""
  return min(32, channels // 4)


def group_norm(x, *, name):
  """GroupNorm with float32 statistics and affine, returned in x's dtype."""
  channels = x.shape[-1]
  groups = num_groups(channels)
  if groups < 1 or channels % groups:
    raise ValueError(f'{name}: GroupNorm with {groups} groups does not divide {channels} channels')
  out = nn.GroupNorm(num_groups=groups, dtype=jnp.float32, param_dtype=jnp.float32, name=name)(
      x.astype(jnp.float32))
  return out.astype(x.dtype)


def inv_cos(logsnr):
  """PD's 'inv_cos' noise-level input: t of the cosine schedule, in [0, 1], so the sinusoids see a well-spread
  input whatever the log-SNR range."""
  logsnr = jnp.clip(jnp.asarray(logsnr, jnp.float32), -20.0, 20.0)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


def timestep_embedding(t, *, dim, max_time=1.0):
  """Sinusoidal embedding (B,) -> (B, dim) in float32, as PD's get_timestep_embedding (Fairseq/tensor2tensor)."""
  chex.assert_rank(t, 1)
  t = jnp.asarray(t, jnp.float32) * (1000.0 / max_time)
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  emb = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x):
  """(B, H, W, C) -> (B, 2H, 2W, C) by repetition."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResnetBlock(nn.Module):
  """PD's residual block: GN, swish, [resample], conv, FiLM by the embedding, GN, swish, dropout, zero conv.

  The embedding enters as scale and shift of the second GroupNorm (PD's `temb_proj` of 2 * out_ch), which is
  what PD's 60.0M-parameter CIFAR-10 net has; with resample 'up'/'down' the skip path is resampled too.
  With a semantic embedding `z_emb` (SFERD's gradient predictor, PDAE's ShiftUNet) the block also gets PDAE's
  modulation: h <- (1 + z_scale) * (GN(h) (1 + t_scale) + t_shift) + z_shift, (z_scale, z_shift) from `zemb_proj`.
  Without it the block and its parameters are PD's exactly, so a student's decoder weights fit the modulated copy.
  """
  out_ch: Optional[int] = None
  dropout: float = 0.0
  resample: Optional[str] = None  # None, 'up' or 'down'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, emb, train, z_emb=None):
    batch, _, _, in_ch = x.shape
    chex.assert_shape(emb, (batch, None))
    out_ch = self.out_ch or in_ch
    dtype = jnp.dtype(self.dtype)
    conv = lambda features, name, **kw: nn.Conv(features, (3, 3), dtype=dtype, param_dtype=jnp.float32,
                                                name=name, **kw)
    x = x.astype(dtype)
    h = nn.swish(group_norm(x, name='norm1'))
    if self.resample is not None:
      resample = {'up': upsample_nearest, 'down': downsample_avg}[self.resample]
      h, x = resample(h), resample(x)
    h = conv(out_ch, 'conv1')(h)
    film = lambda name, e: jnp.split(nn.Dense(2 * out_ch, dtype=dtype, param_dtype=jnp.float32, name=name)(
        nn.swish(e))[:, None, None, :], 2, axis=-1)
    scale, shift = film('temb_proj', emb)
    h = group_norm(h, name='norm2') * (1 + scale) + shift
    if z_emb is not None:
      chex.assert_shape(z_emb, (batch, None))
      z_scale, z_shift = film('zemb_proj', z_emb)
      h = (1 + z_scale) * h + z_shift
    h = nn.swish(h)
    h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
    h = conv(out_ch, 'conv2', kernel_init=nn.initializers.zeros)(h)
    if in_ch != out_ch:
      # A 1x1 projection, as a Dense on the channel axis (PD's parameter layout).
      x = nn.Dense(out_ch, dtype=dtype, param_dtype=jnp.float32, name='nin_shortcut')(x)
    chex.assert_equal_shape([x, h])
    return x + h


class AttnBlock(nn.Module):
  """Self-attention over the H*W positions with a residual connection; exactly one of num_heads, head_dim is set.

  With `capture` the block computes softmax(q k^T / sqrt(d)) in float32 itself and sows it, shape
  (B, heads, T_query, T_key), under intermediates/<block name>/attention_probs; otherwise it calls the fused
  jax.nn.dot_product_attention. Both paths have the same parameters.
  """
  num_heads: Optional[int] = None
  head_dim: Optional[int] = None
  capture: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    if bool(self.num_heads) == bool(self.head_dim):
      raise ValueError(f'{self.name}: set exactly one of num_heads={self.num_heads}, head_dim={self.head_dim}')
    heads = self.num_heads or channels // self.head_dim
    head_dim = channels // heads
    if heads * head_dim != channels:
      raise ValueError(f'{self.name}: {channels} channels do not split into heads of {self.num_heads or "?"} x '
                       f'{self.head_dim or "?"}')
    dtype = jnp.dtype(self.dtype)
    dense = lambda name: nn.DenseGeneral((heads, head_dim), dtype=dtype, param_dtype=jnp.float32, name=name)

    h = group_norm(x.astype(dtype), name='norm').reshape(batch, height * width, channels)
    q, k, v = dense('q')(h), dense('k')(h), dense('v')(h)
    if self.capture:
      logits = jnp.einsum('bqnd,bknd->bnqk', q, k, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(logits.astype(jnp.float32) / math.sqrt(head_dim), axis=-1)
      self.sow(ATTENTION_COLLECTION, ATTENTION_KEY, probs)
      h = jnp.einsum('bnqk,bknd->bqnd', probs.astype(v.dtype), v)
    else:
      h = jax.nn.dot_product_attention(q, k, v)
    chex.assert_shape(h, (batch, height * width, heads, head_dim))
    h = nn.DenseGeneral(channels, axis=(-2, -1), dtype=dtype, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.zeros, name='proj_out')(h)
    return x.astype(dtype) + h.reshape(batch, height, width, channels)
