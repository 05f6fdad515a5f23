"""SFERD's semantic encoder E_phi and gradient predictor G_tau as modules (SFERD.md §4; research/sferd_paper.md §1.5).

    encoder, predictor = make_semantic_models(config.model, config.sferd.semantic)
    params = jax.jit(functools.partial(init_semantic_params, encoder, predictor, model_config=config.model))(rng)
    z_sem = encoder.apply({'params': params['encoder']}, x0)                            # (B, latent_dim)

Two forms of G_tau, both ending in a zero-initialised conv (so the shifted student starts as the plain one):
  'shift' (default, PDAE's ShiftUNet): a trainable copy of the student U-Net's decoder half (middle block, up path,
    output conv) that reads the frozen student encoder's (h, skips, emb), every ResnetBlock modulated by z_sem.
  'separate': a small stand-alone conv net G(z_t, logsnr, z_sem) with the same modulation, no student features.
Their raw output becomes the gradient g ~ grad_{z_t} log p(z_sem | z_t) in sferd/semantic_predictor.py, which also
holds the shift of the student's prediction, the training targets and loss: this module is architecture only.
Parameters are float32; `dtype` is the compute dtype (the model config's), outputs are float32.
"""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sferd_jax.models import layers
from sferd_jax.models import unet

FORMS = ('shift', 'separate')
# Every key of the config's `semantic` section that the models read (make_semantic_models reads them all); the
# section's other keys (the target, the gradient's parameterisation, ...) belong to sferd/semantic_predictor.py.
SEMANTIC_MODEL_KEYS = ('latent_dim', 'encoder_ch', 'form', 'separate_ch')
SEMANTIC_DEFAULTS = dict(latent_dim=128, encoder_ch=64, form='shift', separate_ch=64)


def _conv(features, name, dtype, **kwargs):
  return nn.Conv(features, (3, 3), dtype=jnp.dtype(dtype), param_dtype=jnp.float32, name=name, **kwargs)


def encoder_stages(image_size):
  """[(resolution after the stage's stride-2 conv)]: halve until 4 x 4 (2 x 2 for inputs of 8 px or less)."""
  if image_size < 4:
    raise ValueError(f'the semantic encoder needs images of at least 4 px, got {image_size}')
  target = 2 if image_size <= 8 else 4
  sizes, size = [], image_size
  while size > target:
    size = -(-size // 2)  # SAME padding with stride 2 rounds up, so odd sizes (28 -> 14 -> 7 -> 4) work too.
    sizes.append(size)
  return sizes


class SemanticEncoder(nn.Module):
  """E_phi: image (B, H, W, C) in [-1, 1] -> z_sem (B, latent_dim) float32.

  PDAE's encoder shortened to the image size: stride-2 3x3 convs of ch * (1, 2, 4, 4, ...) channels, each followed
  by GroupNorm + SiLU, one attention block after the middle stage's conv (PDAE's 128 px net has it at 16 x 16),
  flatten, Dense. With 64 px and ch 64: 32, 16 (attention), 8, 4 -> 4 * 4 * 256 = 4096 features, as PDAE's.
  """
  latent_dim: int = 128
  ch: int = 64
  image_size: int = 32
  num_heads: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch = x.shape[0]
    chex.assert_rank(x, 4)
    if x.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'the semantic encoder was built for {self.image_size} px images, got {x.shape[1:3]}')
    sizes = encoder_stages(self.image_size)
    attn_stage = (len(sizes) - 1) // 2
    h = x.astype(jnp.dtype(self.dtype))
    for i in range(len(sizes)):
      h = _conv(self.ch * min(2**i, 4), f'conv{i}', self.dtype, strides=(2, 2))(h)
      if i == attn_stage:
        h = layers.AttnBlock(num_heads=self.num_heads, dtype=self.dtype, name='attn')(h)
      h = nn.swish(layers.group_norm(h, name=f'norm{i}'))
    chex.assert_shape(h, (batch, sizes[-1], sizes[-1], None))
    z_sem = nn.Dense(self.latent_dim, dtype=jnp.dtype(self.dtype), param_dtype=jnp.float32, name='out')(
        h.reshape(batch, -1))
    return z_sem.astype(jnp.float32)


class ShiftDecoder(unet.UNetFields):
  """G_tau's trainable part in the 'shift' form: the student's decoder half with every ResnetBlock modulated by z_sem.

  The U-Net's own fields, blocks (layers.ResnetBlock given z_emb) and layout (unet.decoder_path), so its parameters
  are the student decoder's plus `zemb_proj` per block and `z_embed` (PDAE's label_emb, latent_dim -> emb_ch,
  shared by every block): a warm start from the student cannot drift from the student's architecture.
  Takes the frozen student encoder's (h, skips, emb) at (z, logsnr) and z_sem (B, latent_dim); returns the raw
  output (B, H, W, out_channels) float32, zero at initialisation (conv_out is zero-initialised).
  """

  @nn.compact
  def __call__(self, h, skips, emb, z_sem, *, train):
    chex.assert_rank(z_sem, 2)
    chex.assert_axis_dimension(z_sem, 0, h.shape[0])
    z_emb = nn.Dense(self.emb_ch, dtype=jnp.dtype(self.dtype), param_dtype=jnp.float32, name='z_embed')(
        z_sem.astype(jnp.dtype(self.dtype)))
    resnet = lambda name, **kw: functools.partial(self._resnet(name, **kw), emb=emb, z_emb=z_emb, train=train)
    return unet.decoder_path(self, h, skips, resnet=resnet, attn=self._attn, conv=self._conv).astype(jnp.float32)


class SeparateGradientNet(nn.Module):
  """G_tau in the 'separate' form: G(z_t, logsnr, z_sem) -> g (B, H, W, out_channels) float32, no student.

  conv_in, `num_blocks` modulated ResnetBlocks at full resolution (noise level and z_sem both enter every block,
  as in the shift form), GroupNorm + SiLU, zero-initialised conv_out. Cheap; its receptive field is small
  (2 * num_blocks + 2 convs), which is why 'shift' is the default.
  """
  ch: int = 64
  out_channels: int = 3
  num_blocks: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, logsnr, z_sem, *, train):
    batch = z.shape[0]
    chex.assert_rank(z, 4)
    chex.assert_shape(logsnr, (batch,))
    chex.assert_shape(z_sem, (batch, None))
    dtype = jnp.dtype(self.dtype)
    emb_ch = 4 * self.ch
    dense = lambda features, name: nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)
    emb = layers.timestep_embedding(layers.inv_cos(logsnr), dim=self.ch)
    emb = dense(emb_ch, 'dense1')(nn.swish(dense(emb_ch, 'dense0')(emb)))
    z_emb = dense(emb_ch, 'z_embed')(z_sem.astype(dtype))
    h = _conv(self.ch, 'conv_in', self.dtype)(z.astype(dtype))
    for i in range(self.num_blocks):
      h = layers.ResnetBlock(dtype=self.dtype, name=f'block{i}')(h, emb=emb, z_emb=z_emb, train=train)
    h = nn.swish(layers.group_norm(h, name='norm_out'))
    h = _conv(self.out_channels, 'conv_out', self.dtype, kernel_init=nn.initializers.zeros)(h)
    return h.astype(jnp.float32)


# Config entry points. `model_config` is the config's `model` section, `semantic_config` its `semantic` section.


def validate_semantic_config(semantic_config):
  """Raises ValueError saying what to change when the semantic section cannot build the models."""
  missing = [k for k in SEMANTIC_MODEL_KEYS if k not in semantic_config]
  if missing:
    raise ValueError(f'semantic config lacks {missing}; defaults: {SEMANTIC_DEFAULTS}')
  if semantic_config['form'] not in FORMS:
    raise ValueError(f'semantic.form must be one of {FORMS}, got {semantic_config["form"]!r}')
  if semantic_config['latent_dim'] < 1:
    raise ValueError(f'semantic.latent_dim must be >= 1, got {semantic_config["latent_dim"]}')
  for key in ('encoder_ch', 'separate_ch'):
    ch = semantic_config[key]
    # GroupNorm takes min(32, C // 4) groups of the encoder's ch, 2 ch and 4 ch channels, its attention 4 heads.
    if ch < 4 or ch % 4 or any(c % layers.num_groups(c) for c in (ch, 2 * ch, 4 * ch)):
      raise ValueError(f'semantic.{key}={ch}: use a multiple of 4 whose GroupNorms divide evenly '
                       '(min(32, C // 4) groups of C = ch, 2 ch, 4 ch), e.g. 32, 64 or 128')


def make_semantic_models(model_config, semantic_config):
  """(SemanticEncoder, predictor) for the student of `model_config`; predictor per semantic.form."""
  validate_semantic_config(semantic_config)
  student = unet.make_unet(model_config)
  dtype = unet.compute_dtype(model_config['dtype'])
  encoder = SemanticEncoder(latent_dim=int(semantic_config['latent_dim']), ch=int(semantic_config['encoder_ch']),
                            image_size=int(model_config['image_size']), dtype=dtype)
  channels, separate_ch = int(model_config['channels']), int(semantic_config['separate_ch'])
  if semantic_config['form'] == 'shift':
    # The student's own fields (its dropout too), but one output per image channel: g, not a 'both' output.
    predictor = ShiftDecoder(**dict(student.field_values(), out_channels=channels, capture_attention=()))
  else:
    predictor = SeparateGradientNet(ch=separate_ch, out_channels=channels, dtype=dtype)
  return encoder, predictor


def _dummy_predictor_inputs(predictor, model_config, latent_dim):
  size, channels = model_config['image_size'], model_config['channels']
  z = jnp.zeros((1, size, size, channels), jnp.float32)
  logsnr = jnp.zeros((1,), jnp.float32)
  z_sem = jnp.zeros((1, latent_dim), jnp.float32)
  if isinstance(predictor, SeparateGradientNet):
    return z, logsnr, z_sem
  student = unet.make_unet(model_config)
  labels = jnp.zeros((1,), jnp.int32) if student.num_classes > 0 else None

  def features():
    variables = student.init(jax.random.key(0), z, logsnr, labels, train=False)
    return student.apply(variables, z, logsnr, labels, train=False, method=unet.UNet.encode)

  # Shapes only: nothing of the student is computed.
  h, skips, emb = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(features))
  return h, skips, emb, z_sem


def init_semantic_params(encoder, predictor, rng, *, model_config):
  """{'encoder': E_phi's params, 'predictor': G_tau's params}, float32, for images of the config's size.

  Traceable, like unet.init_params: call it under jit (an un-jitted init runs every initialiser op by op).
  """
  size, channels = model_config['image_size'], model_config['channels']
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  predictor_inputs = _dummy_predictor_inputs(predictor, model_config, encoder.latent_dim)
  rng_e, rng_p = jax.random.split(rng)
  return {'encoder': encoder.init(rng_e, x)['params'],
          'predictor': predictor.init(rng_p, *predictor_inputs, train=False)['params']}


def warm_start_from_student(predictor_params, student_params):
  """The shift predictor's params with every leaf that the student's decoder has, at the same path and shape,
  copied from it (PDAE trains its shift branch from scratch; this is an option). conv_out stays zero, so g = 0.
  """
  decoder = student_params['decoder']

  def pick(path, leaf):
    node = decoder
    for key in path:
      if not hasattr(node, 'keys') or key.key not in node:
        return leaf
      node = node[key.key]
    if path[0].key == 'conv_out' or getattr(node, 'shape', None) != leaf.shape:
      return leaf
    return jnp.asarray(node, leaf.dtype)

  return jax.tree_util.tree_map_with_path(pick, predictor_params)
