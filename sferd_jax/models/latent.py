"""The latent diffusion over normalised semantic codes, for sampling z_sem without a real image (SFERD.md §4).

    stats = latent_statistics(codes)                      # codes = E_phi(x0) over the dataset, (N, D)
    model = make_latent_model(config.latent, num_classes=config.model.num_classes)   # 0: unconditional
    params = jax.jit(functools.partial(init_latent_params, model, dim=D))(rng)
    loss = latent_loss(params, model=model, codes=normalize(batch_codes, stats), rng=rng,
                       labels=batch_labels)              # labels (B,) int when num_classes > 0, else None
    z_sem = sample_latents(params, rng, model=model, num_samples=64, dim=D, num_steps=config.latent.num_steps,
                           stats=stats, labels=labels)   # de-normalised, ready for the gradient predictor

PDAE's latent DPM (an MLP with skip connections, on codes normalised by the dataset's mean and std) in this
project's continuous-time maths: the cosine log-SNR schedule, diffuse/predict from diffusion/process.py and the
DDIM loop of diffusion/samplers.py on (B, D) arrays. PDAE itself trains a constant-beta (0.008) 1000-step DDPM with
an L1 eps loss.

The denoiser outputs v by default, not PDAE's eps: the cosine schedule starts at lambda = -20, where alpha = 4.5e-5,
and the first DDIM step's x = (z - sigma eps_hat) / alpha multiplies the eps error by 2.2e4 (codes are not clipped
to rescue it). On an 8-D 4-mode Gaussian mixture (4-layer net, 3000 Adam steps), eps-output samples landed a median
~3600 away from the nearest mode with either eps or v loss; v-output samples 0.8 away, as the data, with eps_mse,
v_mse or snr_trunc loss alike.

For class-conditional image models (num_classes > 0) the latent model is class-conditional too, so that a code
drawn with label y is a code of class y (the image model is then sampled with the same labels).
"""

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sferd_jax.diffusion import losses
from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules
from sferd_jax.models import layers

# Every key of the config's `latent` section that this module reads (validate_latent_config reads them all).
LATENT_KEYS = ('num_layers', 'width', 'num_steps')
LATENT_DEFAULTS = dict(num_layers=10, width=512, num_steps=100)
# losses.LOSS_TYPES plus PDAE's L1 on eps.
LATENT_LOSS_TYPES = losses.LOSS_TYPES + ('eps_l1',)


class LatentStats(NamedTuple):
  """Per-dimension mean and (floored) std of a dataset's codes, each (D,) float32. A pytree: checkpoint it."""
  mean: jnp.ndarray
  std: jnp.ndarray


def latent_statistics(codes, *, min_std=1e-3):
  """(mean, std) over the N codes (N, D). The std is floored at min_std: a dimension that E_phi keeps constant
  would otherwise be divided by ~0 and amplify float noise into the latent model's inputs."""
  codes = jnp.asarray(codes, jnp.float32)
  chex.assert_rank(codes, 2)
  mean = codes.mean(axis=0)
  # Two-pass variance: more accurate than E[x^2] - E[x]^2 for codes far from zero.
  std = jnp.sqrt(jnp.mean((codes - mean)**2, axis=0))
  return LatentStats(mean=mean, std=jnp.maximum(std, min_std))


def normalize(codes, stats):
  return (codes - stats.mean) / stats.std


def denormalize(codes, stats):
  return codes * stats.std + stats.mean


class MLPSkipNet(nn.Module):
  """Denoiser of (B, D) codes at log-SNR (B,) -> raw output (B, D) float32 (v or eps, per output_type).

  PDAE/DiffAE's MLPSkipNet: num_layers Dense layers in all, num_layers - 1 hidden ones of `width` (Dense, LayerNorm,
  FiLM by the noise-level embedding, SiLU) and a zero-initialised output Dense; the input code is concatenated to
  the input of every layer after the first (the skip connections). The noise level enters as the U-Net's does:
  t = inv_cos(logsnr) in [0, 1], sinusoids of time_emb_dim, a 2-layer MLP. PDAE multiplies by (1 + cond) before its
  LayerNorm; here FiLM (scale and shift) acts after it, where the norm cannot undo the scale.

  num_classes > 0: class-conditional. A class embedding of labels (B,) int is added to the noise-level embedding
  that drives every FiLM layer, as the U-Net adds its class embedding to its time embedding. num_classes = 0 has
  no 'class_emb' parameter and takes labels=None.
  """
  num_layers: int = 10
  width: int = 512
  time_emb_dim: int = 64
  output_type: str = 'v'  # 'v' or 'eps' (see the module docstring for why v)
  num_classes: int = 0    # 0 = unconditional
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, logsnr, labels=None):
    batch, dim = x.shape
    chex.assert_shape(logsnr, (batch,))
    if self.num_classes > 0 and labels is None:
      raise ValueError(f'this latent model is class-conditional (num_classes={self.num_classes}): pass labels (B,)')
    if self.num_classes <= 0 and labels is not None:
      raise ValueError('this latent model is unconditional (num_classes=0): pass labels=None')
    if self.num_layers < 2:
      raise ValueError(f'MLPSkipNet needs num_layers >= 2 (hidden layers + the output layer), got {self.num_layers}')
    if self.output_type not in ('v', 'eps', 'x'):
      raise ValueError(f"MLPSkipNet's output_type must be 'v', 'eps' or 'x', got {self.output_type!r}")
    dtype = jnp.dtype(self.dtype)
    dense = lambda features, name, **kw: nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name, **kw)
    emb = layers.timestep_embedding(layers.inv_cos(logsnr), dim=self.time_emb_dim)
    emb = nn.swish(dense(self.width, 'time_dense1')(nn.swish(dense(self.width, 'time_dense0')(emb))))
    if self.num_classes > 0:
      chex.assert_shape(labels, (batch,))
      # Added after the time MLP, so that num_classes=0 keeps the unconditional model's params and outputs.
      emb = emb + nn.Embed(self.num_classes, self.width, dtype=dtype, param_dtype=jnp.float32,
                           name='class_emb')(labels)
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


def denoise(model, params, z, logsnr, *, labels=None):
  """The latent model's Prediction(x, eps, v) of normalised codes at (z, logsnr), of class labels (B,) int for a
  class-conditional model (None for an unconditional one)."""
  out = model.apply({'params': params}, z, logsnr, labels)
  return process.predict(output=out, z=z, logsnr=logsnr, output_type=model.output_type)


def latent_loss(params, *, model, codes, rng, labels=None, loss_type='eps_mse', logsnr_min=schedules.LOGSNR_MIN,
                logsnr_max=schedules.LOGSNR_MAX):
  """Mean denoising loss of the latent model on a batch of normalised codes (B, D), of class labels (B,) int when
  the model is class-conditional (None otherwise).

  t ~ U(0, 1), lambda = the project's cosine log-SNR schedule, z = alpha x + sigma eps: the image model's
  continuous-time maths, not PDAE's constant-beta DDPM. loss_type: 'eps_mse' (default), 'eps_l1' (PDAE's),
  'v_mse' or 'snr_trunc' (diffusion/losses.py), whatever the model's output type.
  """
  chex.assert_rank(codes, 2)
  if loss_type not in LATENT_LOSS_TYPES:
    raise ValueError(f'loss_type must be one of {LATENT_LOSS_TYPES}, got {loss_type!r}')
  codes = codes.astype(jnp.float32)
  rng_t, rng_eps = jax.random.split(rng)
  t = jax.random.uniform(rng_t, (codes.shape[0],))
  logsnr = schedules.cosine_logsnr(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
  eps = jax.random.normal(rng_eps, codes.shape, jnp.float32)
  z = process.diffuse(x=codes, eps=eps, logsnr=logsnr)
  pred = denoise(model, params, z, logsnr, labels=labels)
  if loss_type == 'eps_l1':
    return jnp.mean(jnp.abs(pred.eps - eps))
  return losses.denoising_loss(pred=pred, x_target=codes, eps_target=eps, logsnr=logsnr, loss_type=loss_type).mean()


def sample_latents(params, rng, *, model, num_samples, dim, num_steps=100, stats=None, labels=None,
                   logsnr_min=schedules.LOGSNR_MIN, logsnr_max=schedules.LOGSNR_MAX):
  """num_samples de-normalised codes (num_samples, dim) float32 from num_steps DDIM steps, starting at N(0, I).

  Deterministic in rng. num_samples and dim are static (shapes); num_steps and labels may be traced. clip_x is
  off: codes are not bounded like pixels. stats=None returns the normalised codes. labels: (num_samples,) int, the
  class of each code, for a class-conditional model (None for an unconditional one).
  """
  if labels is not None:
    chex.assert_shape(labels, (num_samples,))
  z_init = jax.random.normal(rng, (num_samples, dim), jnp.float32)
  codes = samplers.sample_loop(denoise_fn=lambda z, logsnr: denoise(model, params, z, logsnr, labels=labels),
                               z_init=z_init, num_steps=num_steps, rng=jax.random.fold_in(rng, 1), sampler='ddim',
                               clip_x=False, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
  return codes if stats is None else denormalize(codes, stats)


# Config entry points. `latent_config` is the config's `latent` section (any mapping, ConfigDict included).


def validate_latent_config(latent_config):
  """Raises ValueError saying what to change when the latent section cannot work; reads every LATENT_KEYS key."""
  missing = [k for k in LATENT_KEYS if k not in latent_config]
  if missing:
    raise ValueError(f'latent config lacks {missing}; defaults: {LATENT_DEFAULTS}')
  if latent_config['num_layers'] < 2:
    raise ValueError(f'latent.num_layers must be >= 2 (hidden layers + output), got {latent_config["num_layers"]}')
  if latent_config['width'] < 1:
    raise ValueError(f'latent.width must be >= 1, got {latent_config["width"]}')
  if latent_config['num_steps'] < 1:
    raise ValueError(f'latent.num_steps (DDIM sampling steps) must be >= 1, got {latent_config["num_steps"]}')


def make_latent_model(latent_config, *, num_classes=0, dtype=jnp.float32):
  """The MLPSkipNet of a latent config section (validated; its num_steps is sample_latents' num_steps).

  num_classes: the image model's (config.model.num_classes); > 0 makes the latent model class-conditional.
  """
  validate_latent_config(latent_config)
  if int(num_classes) < 0:
    raise ValueError(f'num_classes must be >= 0 (0 = unconditional), got {num_classes}')
  return MLPSkipNet(num_layers=int(latent_config['num_layers']), width=int(latent_config['width']),
                    num_classes=int(num_classes), dtype=dtype)


def init_latent_params(model, rng, *, dim):
  """float32 params of the latent model for codes of dimension dim (with class 0's labels when it is
  class-conditional). Traceable: call it under jit."""
  labels = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
  return model.init(rng, jnp.zeros((1, dim), jnp.float32), jnp.zeros((1,), jnp.float32), labels)['params']
