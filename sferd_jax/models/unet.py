"""The U-Net of progressive distillation (google-research diffusion_distillation/unet.py), in Flax linen.

    model = make_unet(config.model, capture_attention=('dec16_3_attn',))
    params = init_params(model, rng, model_config=config.model)
    out = model.apply({'params': params}, z, logsnr, labels, train=False)              # (B, H, W, C or 2C) f32
    out, state = model.apply({'params': params}, z, logsnr, labels, train=False, mutable=['intermediates'])
    maps = attention_probs(state['intermediates'])   # {'dec16_3_attn': (B, heads, T, T)}

The model is two submodules, so the semantic gradient predictor can reuse the encoder half of a frozen student:
  params = {'encoder': {dense0, dense1, class_emb, conv_in, enc{res}_{i}, enc{res}_{i}_attn, enc{res}_down},
            'decoder': {mid_0, mid_attn, mid_1, dec{res}_{i}, dec{res}_{i}_attn, dec{res}_up, norm_out, conv_out}}
Apply the encoder alone with the full model's params and `method=UNet.encode`:
    h, skips, emb = model.apply({'params': params}, z, logsnr, labels, train=False, method=UNet.encode)
which equals `UNetEncoder(**fields).apply({'params': params['encoder']}, ...)`; `method=UNet.decode` takes
(h, skips, emb) back to the output. Sown maps sit at intermediates/{encoder|decoder}/<block>/attention_probs.
Attention block names use the resolution the block actually sees, i.e. that of `image_size` inputs.

Two places follow PD's code where a plainer reading was possible: the embedding enters each ResnetBlock as scale
and shift of its second GroupNorm (PD's temb_proj; the CIFAR-10 net then has PD's 60.0M parameters), and the class
embedding is an nn.Embed (PD's one-hot Dense imports exactly as embedding = kernel + bias).
"""

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import process
from sferd_jax.diffusion.process import OUTPUT_TYPES
from sferd_jax.models import layers

COMPUTE_DTYPES = ('float32', 'bfloat16')


class UNetFields(nn.Module):
  """Fields shared by UNet, its two halves and semantic.ShiftDecoder (each reads what it needs)."""
  ch: int
  emb_ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  out_channels: int
  num_heads: Optional[int] = None
  head_dim: Optional[int] = None
  dropout: float = 0.0
  resblock_resample: bool = False
  num_classes: int = 0
  dtype: Any = jnp.float32
  capture_attention: tuple[str, ...] = ()

  def field_values(self):
    """The fields as keyword arguments: a module with the same layout (its other half, a copy) is built from them."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(UNetFields) if f.name not in ('parent', 'name')}

  def _resnet(self, name, out_ch=None, resample=None):
    return layers.ResnetBlock(out_ch=out_ch, dropout=self.dropout, resample=resample, dtype=self.dtype, name=name)

  def _attn(self, name):
    return layers.AttnBlock(num_heads=self.num_heads, head_dim=self.head_dim, capture=name in self.capture_attention,
                            dtype=self.dtype, name=name)

  def _conv(self, features, name, **kwargs):
    return nn.Conv(features, (3, 3), dtype=jnp.dtype(self.dtype), param_dtype=jnp.float32, name=name, **kwargs)


class UNetEncoder(UNetFields):
  """Noise-level (and class) embedding, conv_in and the down path. Returns (h, skips, emb)."""

  @nn.compact
  def __call__(self, z, logsnr, labels=None, *, train):
    batch, height, width, _ = z.shape
    chex.assert_shape(logsnr, (batch,))
    factor = 2**(len(self.ch_mult) - 1)
    if height != width or height % factor:
      raise ValueError(f'input {height}x{width}: the U-Net needs a square image divisible by {factor}')
    dtype = jnp.dtype(self.dtype)
    dense = lambda name: nn.Dense(self.emb_ch, dtype=dtype, param_dtype=jnp.float32, name=name)

    emb = layers.timestep_embedding(layers.inv_cos(logsnr), dim=self.ch)
    emb = dense('dense1')(nn.swish(dense('dense0')(emb)))
    if self.num_classes > 0:
      if labels is None:
        raise ValueError(f'this U-Net is class-conditional (num_classes={self.num_classes}): pass labels (B,)')
      chex.assert_shape(labels, (batch,))
      emb = emb + nn.Embed(self.num_classes, self.emb_ch, dtype=dtype, param_dtype=jnp.float32,
                           name='class_emb')(labels)
    elif labels is not None:
      raise ValueError('this U-Net is unconditional (num_classes=0): pass labels=None')

    h = self._conv(self.ch, 'conv_in')(z.astype(dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      res = h.shape[1]
      for i in range(self.num_res_blocks):
        h = self._resnet(f'enc{res}_{i}', out_ch=self.ch * mult)(h, emb=emb, train=train)
        if res in self.attn_resolutions:
          h = self._attn(f'enc{res}_{i}_attn')(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        if self.resblock_resample:
          h = self._resnet(f'enc{res}_down', resample='down')(h, emb=emb, train=train)
        else:
          h = self._conv(h.shape[-1], f'enc{res}_down', strides=(2, 2))(h)
        skips.append(h)
    return h, tuple(skips), emb


class UNetDecoder(UNetFields):
  """Middle block, up path and output conv. Takes the encoder's (h, skips, emb); returns float32."""

  @nn.compact
  def __call__(self, h, skips, emb, *, train):
    resnet = lambda name, **kw: functools.partial(self._resnet(name, **kw), emb=emb, train=train)
    return decoder_path(self, h, skips, resnet=resnet, attn=self._attn, conv=self._conv).astype(jnp.float32)


def decoder_path(fields, h, skips, *, resnet, attn, conv):
  """The decoder half's layout, shared by UNetDecoder and semantic.ShiftDecoder (whose blocks are modulated).

  Call from a compact method: resnet(name, out_ch=None, resample=None), attn(name) and conv(features, name, **kw)
  build the calling module's blocks, each a function of h; `fields` is that module (ch, ch_mult, num_res_blocks,
  attn_resolutions, resblock_resample, out_channels). The skips are consumed in the order the encoder made them.
  """
  skips = list(skips)
  h = resnet('mid_0')(h)
  h = attn('mid_attn')(h)
  h = resnet('mid_1')(h)
  for level in reversed(range(len(fields.ch_mult))):
    res = h.shape[1]
    for i in range(fields.num_res_blocks + 1):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = resnet(f'dec{res}_{i}', out_ch=fields.ch * fields.ch_mult[level])(h)
      if res in fields.attn_resolutions:
        h = attn(f'dec{res}_{i}_attn')(h)
    if level != 0:
      if fields.resblock_resample:
        h = resnet(f'dec{res}_up', resample='up')(h)
      else:
        h = conv(h.shape[-1], f'dec{res}_up')(layers.upsample_nearest(h))
  if skips:
    raise ValueError(f'{len(skips)} skip features left over: the decoder and the encoder that made them differ')
  h = nn.swish(layers.group_norm(h, name='norm_out'))
  return conv(fields.out_channels, 'conv_out', kernel_init=nn.initializers.zeros)(h)


class UNet(UNetFields):
  """decoder(*encoder(z, logsnr, labels)): the raw output (B, H, W, out_channels) in float32."""

  def setup(self):
    self.encoder = UNetEncoder(**self.field_values())
    self.decoder = UNetDecoder(**self.field_values())

  def __call__(self, z, logsnr, labels=None, *, train):
    return self.decoder(*self.encoder(z, logsnr, labels, train=train), train=train)

  def encode(self, z, logsnr, labels=None, *, train):
    return self.encoder(z, logsnr, labels, train=train)

  def decode(self, h, skips, emb, *, train):
    return self.decoder(h, skips, emb, train=train)


# Config entry points. `model_config` is any mapping (ConfigDict included) with the keys of configs' `model`.


class AttentionBlock(NamedTuple):
  name: str
  resolution: int
  channels: int


def compute_dtype(value):
  """'float32' | 'bfloat16' | a jnp dtype -> jnp.dtype."""
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in COMPUTE_DTYPES:
    raise ValueError(f'model.dtype must be one of {COMPUTE_DTYPES}, got {value!r}')
  return dtype


def _resolutions(model_config):
  return [model_config['image_size'] // 2**i for i in range(len(model_config['ch_mult']))]


def attention_blocks(model_config):
  """[(name, resolution, channels)] of every attention block in model order, from the config alone."""
  res, ch, mult = _resolutions(model_config), model_config['ch'], model_config['ch_mult']
  attn, nrb = tuple(model_config['attn_resolutions']), model_config['num_res_blocks']
  blocks = [AttentionBlock(f'enc{r}_{i}_attn', r, ch * m) for r, m in zip(res, mult) if r in attn for i in range(nrb)]
  blocks.append(AttentionBlock('mid_attn', res[-1], ch * mult[-1]))
  blocks += [AttentionBlock(f'dec{r}_{i}_attn', r, ch * m)
             for r, m in reversed(list(zip(res, mult))) if r in attn for i in range(nrb + 1)]
  return blocks


def default_guidance_block(model_config):
  """The last decoder attention block at the highest resolution the decoder attends at (SFERD.md §3)."""
  decoder = [b for b in attention_blocks(model_config) if not b.name.startswith('enc')]
  top = max(b.resolution for b in decoder)
  return [b.name for b in decoder if b.resolution == top][-1]


def attention_probs(intermediates):
  """{block name: (B, heads, T_query, T_key) float32} of every map sown in an intermediates collection.

  Takes the collection (state['intermediates']) or the dict holding it (state), and unwraps sow's tuple.
  """
  found = {}

  def walk(tree):
    for name, sub in tree.items():
      if not isinstance(sub, Mapping):
        continue
      if layers.ATTENTION_KEY in sub:
        maps = sub[layers.ATTENTION_KEY]
        if len(maps) != 1:
          raise ValueError(f'{name} sowed {len(maps)} maps (it ran more than once in this apply); expected one')
        found[name] = maps[0]
      walk(sub)

  walk(intermediates.get(layers.ATTENTION_COLLECTION, intermediates))
  return found


def _norm_channels(model_config):
  """{channels: where} for every GroupNorm of the net."""
  ch, mult, nrb = model_config['ch'], model_config['ch_mult'], model_config['num_res_blocks']
  seen = {}
  skips, c = [ch], ch
  for level, m in enumerate(mult):
    for i in range(nrb):
      seen.setdefault(c, f'encoder level {level} block {i} input')
      c = ch * m
      seen.setdefault(c, f'encoder level {level}')
      skips.append(c)
    if level != len(mult) - 1:
      skips.append(c)
  for level in reversed(range(len(mult))):
    for i in range(nrb + 1):
      s = skips.pop()
      seen.setdefault(c + s, f'decoder level {level} block {i} input ({c} + skip {s})')
      c = ch * mult[level]
      seen.setdefault(c, f'decoder level {level}')
  return seen


def validate_model_config(model_config):
  """Raises ValueError saying what to change when the config cannot build a U-Net."""
  if process.head_type(model_config['output_type']) not in OUTPUT_TYPES:
    raise ValueError(f'model.output_type must be one of {OUTPUT_TYPES}, got {model_config["output_type"]!r}')
  compute_dtype(model_config['dtype'])
  mult, size = tuple(model_config['ch_mult']), model_config['image_size']
  if not mult or model_config['num_res_blocks'] < 1 or model_config['ch'] < 1:
    raise ValueError('model.ch_mult must be non-empty and model.num_res_blocks, model.ch at least 1')
  if not 0.0 <= model_config['dropout'] < 1.0 or model_config['num_classes'] < 0:
    raise ValueError('model.dropout must be in [0, 1) and model.num_classes >= 0 (0 = unconditional)')
  factor = 2**(len(mult) - 1)
  if size % factor:
    raise ValueError(f'model.image_size={size} is not divisible by 2**(len(ch_mult) - 1) = {factor}: '
                     f'use an image_size that is a multiple of {factor} or fewer ch_mult levels')
  reached = _resolutions(model_config)
  missing = [r for r in model_config['attn_resolutions'] if r not in reached]
  if missing:
    raise ValueError(f'model.attn_resolutions {missing} are never reached; the net sees resolutions {reached}')
  heads, head_dim = model_config['num_heads'], model_config['head_dim']
  if bool(heads) == bool(head_dim):
    raise ValueError(f'set exactly one of model.num_heads ({heads}) and model.head_dim ({head_dim}); '
                     'the other must be None or 0')
  for block in attention_blocks(model_config):
    if block.channels % (heads or head_dim):
      what = f'num_heads={heads}' if heads else f'head_dim={head_dim}'
      raise ValueError(f'{block.name} has {block.channels} channels, not divisible by {what}: change '
                       f'{"num_heads" if heads else "head_dim"}, ch or ch_mult')
  for channels, where in _norm_channels(model_config).items():
    groups = layers.num_groups(channels)
    if groups < 1 or channels % groups:
      raise ValueError(f'GroupNorm uses min(32, C // 4) groups, which does not divide C={channels} ({where}): '
                       'choose ch and ch_mult so that every channel count is a multiple of 4 (of 32 from 128 up)')


def make_unet(model_config, *, capture_attention=()):
  """The UNet of a validated `model` config; `capture_attention` names blocks from attention_blocks()."""
  validate_model_config(model_config)
  capture_attention = tuple(capture_attention)
  names = [b.name for b in attention_blocks(model_config)]
  unknown = [n for n in capture_attention if n not in names]
  if unknown:
    raise ValueError(f'capture_attention {unknown} are not attention blocks of this model; it has {names}')
  return UNet(
      ch=model_config['ch'],
      emb_ch=model_config['emb_ch'],
      ch_mult=tuple(model_config['ch_mult']),
      num_res_blocks=model_config['num_res_blocks'],
      attn_resolutions=tuple(model_config['attn_resolutions']),
      out_channels=model_config['channels'] * (2 if process.head_type(model_config['output_type']) == 'both' else 1),
      num_heads=model_config['num_heads'] or None,
      head_dim=model_config['head_dim'] or None,
      dropout=float(model_config['dropout']),
      resblock_resample=bool(model_config['resblock_resample']),
      num_classes=model_config['num_classes'],
      dtype=compute_dtype(model_config['dtype']),
      capture_attention=capture_attention)


def _dummy_inputs(model, model_config):
  size, channels = model_config['image_size'], model_config['channels']
  z = jnp.zeros((1, size, size, channels), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
  return z, jnp.zeros((1,), jnp.float32), labels


def init_params(model, rng, *, model_config):
  """float32 params of `model` for images of the config's size, from an init on a batch of 1.

  Traceable: call it under jit (the training loop initialises the whole TrainState in one jit), since an
  un-jitted init runs hundreds of initialisers op by op.
  """
  return model.init(rng, *_dummy_inputs(model, model_config), train=False)['params']


def param_count(model_config):
  """Number of parameters, from shapes only (jax.eval_shape; nothing is allocated)."""
  model = make_unet(model_config)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          *_dummy_inputs(model, model_config))['params']
  return sum(x.size for x in jax.tree_util.tree_leaves(shapes))
