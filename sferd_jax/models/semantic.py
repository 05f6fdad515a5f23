"""SFERD's semantic encoder E_phi and gradient predictor G_tau (SFERD.md §4; research/sferd_paper.md §1.5, PDAE).

    encoder, predictor = make_semantic_models(config.model, config.semantic)
    params = jax.jit(functools.partial(init_semantic_params, encoder, predictor, model_config=config.model))(rng)
    z_sem = encoder.apply({'params': params['encoder']}, x0)                            # (B, latent_dim)
    pred, features = frozen_student(student, student_params, z, logsnr, labels, output_type=...)
    g = predict_gradient(predictor, params['predictor'], z=z, logsnr=logsnr, z_sem=z_sem, features=features)

g approximates grad_{z_t} log p(z_sem | z_t) and has the image's shape; sferd/semantic_gradient.py turns it into
the shift of the student's x prediction and holds the loss; model_semantic_loss and shifted_denoise_fn below join
them to the modules for a train step and for the sampler. Two forms of G_tau:
  'shift' (default, PDAE's ShiftUNet): a trainable copy of the student U-Net's decoder half (middle block, up path,
    output conv) that reads the frozen student encoder's (h, skips, emb), every ResnetBlock modulated by z_sem.
  'separate': a small stand-alone conv net G(z_t, logsnr, z_sem) with the same modulation, no student features.
Both end in a zero-initialised conv, so g = 0 and the shifted student is the plain student at initialisation.
Their raw output d is the x shift by default and g = d / (sigma^2 / alpha) (gradient_param='x_shift'); with
'score' the raw output is g itself, as in PDAE and the official code. Same maths, but at lambda = -20, where a
1-step student lives, sigma^2 / alpha = 2.2e4 and a raw g must be ~1e-4: on a 1-step toy (8 px digits, Adam 1e-4)
'score' jumped from loss 0.74 to 5.7 in 50 steps and reached 0.50 by step 300, 'x_shift' fell steadily to 0.24.
Parameters are float32; `dtype` is the compute dtype (the model config's), outputs are float32.
"""

import functools
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import process
from sferd_jax.models import layers
from sferd_jax.models import unet
from sferd_jax.sferd import semantic_gradient

FORMS = ('shift', 'separate')
GRADIENT_PARAMS = ('x_shift', 'score')
# Every key of the config's `semantic` section that the models read (make_semantic_models reads them all);
# gradient_param may be left out (it defaults to 'x_shift'), the others are required.
SEMANTIC_MODEL_KEYS = ('latent_dim', 'encoder_ch', 'form', 'separate_ch', 'gradient_param')
SEMANTIC_DEFAULTS = dict(latent_dim=128, encoder_ch=64, form='shift', separate_ch=64, gradient_param='x_shift')
_OPTIONAL_KEYS = ('gradient_param',)


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


class ModulatedResnetBlock(nn.Module):
  """The U-Net's ResnetBlock plus PDAE's semantic modulation of its second GroupNorm.

  h <- (1 + z_scale) * (GN(h) (1 + t_scale) + t_shift) + z_shift, with (t_scale, t_shift) from the noise-level
  embedding as in layers.ResnetBlock and (z_scale, z_shift) = Dense(SiLU(z_emb)) from the semantic embedding.
  Parameter names are ResnetBlock's plus `zemb_proj`, so a student decoder's weights fit where the shapes do.
  """
  out_ch: Optional[int] = None
  dropout: float = 0.0
  resample: Optional[str] = None  # None, 'up' or 'down'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, emb, z_emb, train):
    batch, _, _, in_ch = x.shape
    chex.assert_shape([emb, z_emb], (batch, None))
    out_ch = self.out_ch or in_ch
    dtype = jnp.dtype(self.dtype)
    dense = lambda name: nn.Dense(2 * out_ch, dtype=dtype, param_dtype=jnp.float32, name=name)
    x = x.astype(dtype)
    h = nn.swish(layers.group_norm(x, name='norm1'))
    if self.resample is not None:
      resample = {'up': layers.upsample_nearest, 'down': layers.downsample_avg}[self.resample]
      h, x = resample(h), resample(x)
    h = _conv(out_ch, 'conv1', dtype)(h)
    t_scale, t_shift = jnp.split(dense('temb_proj')(nn.swish(emb))[:, None, None, :], 2, axis=-1)
    z_scale, z_shift = jnp.split(dense('zemb_proj')(nn.swish(z_emb))[:, None, None, :], 2, axis=-1)
    h = (1 + z_scale) * (layers.group_norm(h, name='norm2') * (1 + t_scale) + t_shift) + z_shift
    h = nn.swish(h)
    h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
    h = _conv(out_ch, 'conv2', dtype, kernel_init=nn.initializers.zeros)(h)
    if in_ch != out_ch:
      x = nn.Dense(out_ch, dtype=dtype, param_dtype=jnp.float32, name='nin_shortcut')(x)
    chex.assert_equal_shape([x, h])
    return x + h


class ShiftDecoder(nn.Module):
  """G_tau's trainable part in the 'shift' form: a z_sem-modulated copy of UNetDecoder.

  Takes the frozen student encoder's (h, skips, emb) at (z, logsnr), z_sem (B, latent_dim) and logsnr (B,) (for
  gradient_param only); returns g (B, H, W, out_channels) float32. The fields other than gradient_param must be the
  student's (make_semantic_models copies them); block names follow UNetDecoder's, plus `z_embed` (PDAE's label_emb,
  latent_dim -> emb_ch, shared by every block).
  """
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
  dtype: Any = jnp.float32
  gradient_param: str = 'x_shift'

  @nn.compact
  def __call__(self, h, skips, emb, z_sem, logsnr, *, train):
    chex.assert_rank(z_sem, 2)
    chex.assert_axis_dimension(z_sem, 0, h.shape[0])
    dtype = jnp.dtype(self.dtype)
    z_emb = nn.Dense(self.emb_ch, dtype=dtype, param_dtype=jnp.float32, name='z_embed')(z_sem.astype(dtype))
    resnet = lambda name, out_ch=None, resample=None: functools.partial(
        ModulatedResnetBlock(out_ch=out_ch, dropout=self.dropout, resample=resample, dtype=self.dtype, name=name),
        emb=emb, z_emb=z_emb, train=train)
    attn = lambda name: layers.AttnBlock(num_heads=self.num_heads, head_dim=self.head_dim, dtype=self.dtype,
                                         name=name)
    conv = lambda features, name, **kwargs: _conv(features, name, self.dtype, **kwargs)
    # UNetDecoder's layout and block names, so the skips and warm starts line up with the student's decoder.
    h = unet.decoder_path(self, h, skips, resnet=resnet, attn=attn, conv=conv)
    return _to_gradient(h.astype(jnp.float32), logsnr, self.gradient_param)


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
  gradient_param: str = 'x_shift'

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
      h = ModulatedResnetBlock(dtype=self.dtype, name=f'block{i}')(h, emb=emb, z_emb=z_emb, train=train)
    h = nn.swish(layers.group_norm(h, name='norm_out'))
    h = _conv(self.out_channels, 'conv_out', self.dtype, kernel_init=nn.initializers.zeros)(h)
    return _to_gradient(h.astype(jnp.float32), logsnr, self.gradient_param)


def _to_gradient(raw, logsnr, gradient_param):
  """The raw output d -> g: g = d / (sigma^2 / alpha) for 'x_shift', so that the x shift is d itself."""
  if gradient_param == 'score':
    return raw
  if gradient_param != 'x_shift':
    raise ValueError(f'gradient_param must be one of {GRADIENT_PARAMS}, got {gradient_param!r}')
  chex.assert_shape(logsnr, (raw.shape[0],))
  coef = semantic_gradient.shift_coefficient(logsnr)
  return raw / process.expand(coef, raw)


# Applying the predictor next to a frozen student.


def frozen_student(student, student_params, z, logsnr, labels=None, *, output_type):
  """The frozen student's Prediction at (z, logsnr) and its encoder features (h, skips, emb), both stop-gradient.

  One encoder pass serves the student's own decoder and the shift decoder (PDAE's ShiftUNet forward). Inference
  mode: the student is frozen, so no dropout. `student` is a unet.UNet, `student_params` its full params.
  """
  features = student.apply({'params': student_params}, z, logsnr, labels, train=False, method=unet.UNet.encode)
  features = jax.lax.stop_gradient(features)
  out = student.apply({'params': student_params}, *features, train=False, method=unet.UNet.decode)
  pred = process.predict(output=out, z=z, logsnr=logsnr, output_type=output_type)
  return jax.lax.stop_gradient(pred), features


def predict_gradient(predictor, predictor_params, *, z, logsnr, z_sem, features=None, train=False, dropout_rng=None):
  """g (B, H, W, C) float32 from either form of G_tau.

  Args:
    predictor: a ShiftDecoder or a SeparateGradientNet (make_semantic_models' second output).
    predictor_params: its params (the 'predictor' entry of init_semantic_params' tree).
    z: (B, H, W, C) noisy image at log-SNR `logsnr` (B,).
    z_sem: (B, latent_dim) semantic code.
    features: the student encoder's (h, skips, emb) at (z, logsnr) from frozen_student; required by 'shift'.
    train: enables the shift decoder's dropout (the student's dropout rate); needs dropout_rng.
    dropout_rng: a key for dropout, or None.
  """
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
  variables = {'params': predictor_params}
  if isinstance(predictor, ShiftDecoder):
    if features is None:
      raise ValueError("the 'shift' predictor reads the student encoder's features: pass features=(h, skips, emb) "
                       'from frozen_student')
    g = predictor.apply(variables, *jax.lax.stop_gradient(features), z_sem, logsnr, train=train, rngs=rngs)
  elif isinstance(predictor, SeparateGradientNet):
    g = predictor.apply(variables, z, logsnr, z_sem, train=train, rngs=rngs)
  else:
    raise TypeError(f'predictor must be a ShiftDecoder or a SeparateGradientNet, got {type(predictor).__name__}')
  chex.assert_equal_shape([g, z])
  return g


def model_semantic_loss(semantic_params, student_params, *, encoder, predictor, student, output_type, x0, z, logsnr,
                        target, labels=None, loss_type='snr_trunc', train=False,
                        dropout_rng=None):
  """semantic_loss from the modules: the frozen student's pass, E_phi and G_tau all inside.

  student_params is an argument only so that one function serves a jitted step; its gradient is zero (the
  student's outputs are stop-gradient). In a train step differentiate w.r.t. semantic_params (argnums=0).
  """
  student_pred, features = frozen_student(student, student_params, z, logsnr, labels, output_type=output_type)

  def encode_fn(params, images):
    return encoder.apply({'params': params}, images)

  def gradient_fn(params, z_t, logsnr_t, z_sem):
    return predict_gradient(predictor, params, z=z_t, logsnr=logsnr_t, z_sem=z_sem, features=features, train=train,
                            dropout_rng=dropout_rng)

  return semantic_gradient.semantic_loss(semantic_params, encode_fn=encode_fn, gradient_fn=gradient_fn,
                                         student_pred=student_pred, x0=x0, z=z, logsnr=logsnr, target=target,
                                         loss_type=loss_type)


def shifted_denoise_fn(*, student, student_params, output_type, predictor, predictor_params, z_sem, labels=None):
  """denoise_fn(z, logsnr) -> the shifted student's Prediction, for samplers.sample_loop.

  z_sem (B, latent_dim) comes from E_phi of real images or from the latent diffusion (models/latent.py). The
  sampler clips the shifted x (clip_x=True), as it does the plain student's.
  """

  def denoise_fn(z, logsnr):
    pred, features = frozen_student(student, student_params, z, logsnr, labels, output_type=output_type)
    g = predict_gradient(predictor, predictor_params, z=z, logsnr=logsnr, z_sem=z_sem, features=features)
    return semantic_gradient.shifted_prediction(pred=pred, g=g, z=z, logsnr=logsnr)

  return denoise_fn


# Config entry points. `model_config` is the config's `model` section, `semantic_config` its `semantic` section.


def _gradient_param(semantic_config):
  if 'gradient_param' in semantic_config:
    return semantic_config['gradient_param']
  return SEMANTIC_DEFAULTS['gradient_param']


def validate_semantic_config(semantic_config):
  """Raises ValueError saying what to change when the semantic section cannot build the models."""
  missing = [k for k in SEMANTIC_MODEL_KEYS if k not in semantic_config and k not in _OPTIONAL_KEYS]
  if missing:
    raise ValueError(f'semantic config lacks {missing}; defaults: {SEMANTIC_DEFAULTS}')
  if _gradient_param(semantic_config) not in GRADIENT_PARAMS:
    raise ValueError(f'semantic.gradient_param must be one of {GRADIENT_PARAMS}, got '
                     f'{_gradient_param(semantic_config)!r}')
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
  gradient_param = _gradient_param(semantic_config)
  if semantic_config['form'] == 'shift':
    predictor = ShiftDecoder(ch=student.ch, emb_ch=student.emb_ch, ch_mult=student.ch_mult,
                             num_res_blocks=student.num_res_blocks, attn_resolutions=student.attn_resolutions,
                             out_channels=channels, num_heads=student.num_heads, head_dim=student.head_dim,
                             dropout=student.dropout, resblock_resample=student.resblock_resample, dtype=dtype,
                             gradient_param=gradient_param)
  else:
    predictor = SeparateGradientNet(ch=separate_ch, out_channels=channels, dtype=dtype, gradient_param=gradient_param)
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
  return h, skips, emb, z_sem, logsnr


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
