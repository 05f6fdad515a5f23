"""The public sampling API: `sample(params, rng, ...)`; exports.load(path).sample(...) calls it with a model's own
architecture and step count.

The CLI's sample mode, the notebooks, the training loop's grids and the FID evaluator all call `sample`.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sferd_jax.diffusion import process
from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules
from sferd_jax import images as images_lib
from sferd_jax.models import denoiser
from sferd_jax.models import latent
from sferd_jax.models import semantic
from sferd_jax.models import unet
from sferd_jax.sferd import guided_teacher
from sferd_jax.sferd import semantic_predictor
from sferd_jax import sharding

DEFAULT_DIFFUSION = dict(logsnr_min=schedules.LOGSNR_MIN, logsnr_max=schedules.LOGSNR_MAX)


def _frozen(mapping):
  return json.dumps(dict(mapping) if not isinstance(mapping, ml_collections.ConfigDict) else mapping.to_dict(),
                    sort_keys=True, default=list)


@functools.lru_cache(maxsize=32)
def _sampler(model_json, diffusion_json, guidance_json, semantic_json, sampler, clip_x, num_devices):
  """One jitted sampling function per architecture, guidance, predictor and sampler; num_steps is traced, so it
  never recompiles for another step count."""
  model_config = ml_collections.ConfigDict(json.loads(model_json))
  diffusion_config = json.loads(diffusion_json)
  make_denoise = guided_teacher.denoise_factory(model_config, json.loads(guidance_json))
  semantic_config = json.loads(semantic_json)
  mesh = sharding.make_mesh(jax.local_devices()[:num_devices])  # this process's devices only
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh, leading_axes=0)

  def run(params, z, labels, rng, num_steps, semantic_params, code_keys):
    labels = denoiser.labels_or_none(model_config, labels)
    if semantic_config is None:
      denoise = make_denoise(params, labels)
    else:
      denoise = _shifted_denoise(model_config, diffusion_config, semantic_config, params, semantic_params, labels,
                                 code_keys=code_keys, num_steps=num_steps)
    return samplers.sample_loop(denoise_fn=denoise, z_init=z, num_steps=num_steps, rng=rng, sampler=sampler,
                                clip_x=clip_x, **diffusion_config)

  return jax.jit(run, in_shardings=(rep, data, data, rep, rep, rep, data), out_shardings=data), mesh


def batch_sampler(model_config, *, diffusion_config=None, guidance=None, semantic_config=None, sampler='ddim',
                  clip_x=True, num_devices=None):
  """The jitted function sample() runs on each batch, and the mesh of this process's devices it runs on.

  run(params, z, labels, rng, num_steps, semantic_params, code_keys) -> x; z, labels and code_keys are sharded over
  the mesh's batch axis. guidance: an active attention-guidance section or None; semantic_config: a
  SemanticPredictor's config or None. Compiled once per distinct arguments (cached).
  """
  return _sampler(_frozen(model_config), _frozen(diffusion_config or DEFAULT_DIFFUSION),
                  _frozen(guidance) if guidance is not None else 'null',
                  _frozen(semantic_config) if semantic_config is not None else 'null',
                  sampler, bool(clip_x), num_devices or jax.local_device_count())


def _shifted_denoise(model_config, diffusion_config, semantic_config, params, semantic_params, labels, *, code_keys,
                     num_steps):
  """The student shifted by its gradient predictor, with a code z_sem per sample drawn from the latent model.

  semantic_params: {'predictor': G_tau, 'latent': the latent denoiser, 'stats': {'mean', 'std'}}.
  code_keys: one key per sample; each code is drawn from its own key alone (and its label, for class-conditional
  models), so it does not depend on the batch. The last floor(stop_fraction * num_steps) steps run unshifted.
  """
  cfg = semantic_config['semantic']
  z_sem = _draw_codes(model_config, diffusion_config, semantic_config, semantic_params, code_keys, labels)
  _, predictor = semantic.make_semantic_models(model_config, cfg)
  return semantic_predictor.shifted_denoise_fn(
      student=unet.make_unet(model_config), student_params=params, output_type=model_config.output_type,
      predictor=predictor, predictor_params=semantic_params['predictor'], z_sem=z_sem,
      gradient_param=semantic_predictor.setting(cfg, 'gradient_param'), labels=labels, num_steps=num_steps,
      stop_fraction=semantic_predictor.setting(cfg, 'stop_fraction'),
      logsnr_fn=lambda t: schedules.cosine_logsnr(t, **diffusion_config))


def _draw_codes(model_config, diffusion_config, semantic_config, semantic_params, code_keys, labels):
  """One code (latent_dim,) per key from the latent model, of the key's label when the latent model has classes."""
  latent_config = semantic_config['latent']
  num_classes = int(semantic_config.get('latent_num_classes', 0) or 0)
  model = latent.make_latent_model(latent_config, num_classes=num_classes)
  labels = labels if num_classes and labels is not None else jnp.zeros((code_keys.shape[0],), jnp.int32)

  def draw(key, label):
    return latent.sample_latents(
        semantic_params['latent'], key, model=model, num_samples=1, dim=semantic_config['semantic']['latent_dim'],
        num_steps=latent_config['num_steps'], stats=latent.LatentStats(**semantic_params['stats']),
        labels=label[None] if num_classes else None, **diffusion_config)[0]

  return jax.vmap(draw)(code_keys, labels)


def resolve_sampler(model_config, sampler):
  """'auto' -> a model's own sampler: 'consistency' for a consistency model (output type 'consistency_<head>'), whose
  steps re-noise its x with fresh noise; 'ddim' for every other. Any other name is returned as given."""
  if sampler != 'auto':
    return sampler
  return 'consistency' if process.is_consistency(model_config['output_type']) else 'ddim'


def sample_keys(rng, *, num_samples, first_index=0):
  """Keys of samples first_index..first_index+num_samples-1: sample i's key is fold_in(rng, i)."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(first_index, first_index + num_samples))


def initial_noise(rng, *, num_samples, shape, first_index=0):
  """z_1 for samples first_index..first_index+num_samples-1: sample i's noise depends on (rng, i) only."""
  keys = sample_keys(rng, num_samples=num_samples, first_index=first_index)
  return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def sample(params, rng, *, model_config, num_samples, num_steps, labels=None, sampler='auto', clip_x=True,
           diffusion_config=None, guidance=None, semantic=None, batch_size=256):
  """Draws num_samples images with num_steps steps: uint8 (N, H, W, C).

  Deterministic for a given rng. Sample i starts from noise, and with the semantic predictor draws its code z_sem,
  from keys that depend only on (rng, i), so with the DDIM sampler the first k images do not change with
  num_samples or batch_size. Class-conditional models draw uniform labels from rng for all num_samples at once
  (so there the first k images stay fixed only when `labels` (N,) is given). Batches are sharded over this
  process's devices; params may be global (replicated) arrays of a multi-host job: this process's copy is used.
  sampler: 'auto' (the model's own: resolve_sampler), or one of samplers.SAMPLERS.
  guidance: an attention-guidance section (config.sferd.attention_guidance) to sample with the attention-guided
  model (self-attention-guided DDIM), or None.
  semantic: a SemanticPredictor (Model.semantic) to shift the student's x prediction by its semantic gradient
  predictor, with a code per sample drawn from its latent model; None = the plain model.
  """
  if int(num_steps) < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  model_config = ml_collections.ConfigDict(model_config) if not isinstance(model_config,
                                                                           ml_collections.ConfigDict) else model_config
  sampler = resolve_sampler(model_config, sampler)
  noise_rng, label_rng, loop_rng = jax.random.split(rng, 3)
  code_rng = jax.random.fold_in(rng, 3)  # a fourth stream; fold_in(rng, i < 3) would repeat split's keys
  if labels is None:
    labels = jax.random.randint(label_rng, (num_samples,), 0, max(model_config.num_classes, 1))
  labels = np.asarray(labels, np.int32)
  if labels.shape != (num_samples,):
    raise ValueError(f'labels must have shape ({num_samples},), got {labels.shape}')
  num_devices = jax.local_device_count()
  guidance = guidance if guidance is not None and guided_teacher.is_active(guidance) else None
  if guidance is not None and semantic is not None:
    raise ValueError('sampling with both attention guidance and the semantic predictor is not supported; '
                     'choose one')
  run, mesh = batch_sampler(model_config, diffusion_config=diffusion_config, guidance=guidance,
                            semantic_config=None if semantic is None else semantic.config, sampler=sampler,
                            clip_x=clip_x, num_devices=num_devices)
  semantic_params = None if semantic is None else sharding.put_replicated(sharding.host_local(
      {'predictor': semantic.params['predictor'], 'latent': semantic.latent_params, 'stats': semantic.stats}), mesh)
  shape = (model_config.image_size, model_config.image_size, model_config.channels)
  batch_size = min(batch_size, num_samples)
  batch_size = -(-batch_size // num_devices) * num_devices  # a multiple of the device count
  params = sharding.put_replicated(sharding.host_local(params), mesh)  # global arrays would span other processes
  data = sharding.batch_sharding(mesh, leading_axes=0)
  out = []
  for start in range(0, num_samples, batch_size):
    n = min(batch_size, num_samples - start)
    z = initial_noise(noise_rng, num_samples=batch_size, shape=shape, first_index=start)
    code_keys = None if semantic is None else sample_keys(code_rng, num_samples=batch_size, first_index=start)
    batch_labels = np.zeros((batch_size,), np.int32)
    batch_labels[:n] = labels[start:start + n]
    # Placed explicitly: in a multi-process job jit takes host arrays only with a sharding over all processes.
    z, batch_labels, code_keys = jax.device_put((z, batch_labels, code_keys), data)
    step_rng, steps = sharding.put_replicated((jax.random.fold_in(loop_rng, start), jnp.int32(num_steps)), mesh)
    x = run(params, z, batch_labels, step_rng, steps, semantic_params, code_keys)
    out.append(images_lib.to_uint8(jax.device_get(x))[:n])
  return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _sensitivity_fn(model_json, diffusion_json, semantic_json, num_samples, num_codes):
  """The jitted measurement behind code_sensitivity, one per architecture, predictor and size."""
  model_config = ml_collections.ConfigDict(json.loads(model_json))
  diffusion_config, semantic_config = json.loads(diffusion_json), json.loads(semantic_json)
  cfg = semantic_config['semantic']
  _, predictor = semantic.make_semantic_models(model_config, cfg)
  student = unet.make_unet(model_config)
  shape = (num_samples, model_config.image_size, model_config.image_size, model_config.channels)

  @jax.jit
  def run(params, semantic_params, rng):
    noise_rng, label_rng, code_rng = jax.random.split(rng, 3)
    z = jax.random.normal(noise_rng, shape)
    logsnr = jnp.full((num_samples,), schedules.cosine_logsnr(1.0, **diffusion_config))
    labels = jax.random.randint(label_rng, (num_samples,), 0, max(model_config.num_classes, 1))
    labels = denoiser.labels_or_none(model_config, labels)
    pred, features = semantic_predictor.frozen_student(student, params, z, logsnr, labels,
                                                       output_type=model_config.output_type)

    def shifted_x(key):
      z_sem = _draw_codes(model_config, diffusion_config, semantic_config, semantic_params,
                          sample_keys(key, num_samples=num_samples), labels)
      g = semantic_predictor.predict_gradient(
          predictor, semantic_params['predictor'], z=z, logsnr=logsnr, z_sem=z_sem, features=features,
          gradient_param=semantic_predictor.setting(cfg, 'gradient_param'))
      return semantic_predictor.shift_x(x_hat=pred.x, g=g, logsnr=logsnr)

    x_shifted = jnp.stack([shifted_x(jax.random.fold_in(code_rng, k)) for k in range(num_codes)])
    return semantic_predictor.code_sensitivity(x_shifted, pred.x)

  return run


def code_sensitivity(model, rng, *, num_samples=256, num_codes=2):
  """{'code_sensitivity', 'shift_rms'} of a Model's semantic predictor at its first sampling step (t = 1).

  num_samples noise images z_1, each with num_codes codes drawn from the latent model (of the image's class, for
  class-conditional models): the mean |x'(c_i) - x'(c_j)| over pairs of codes at the same z, and the RMS of the
  shift x' - x_hat (x unclipped, images in [-1, 1]). At t = 1 the code is all that tells samples apart beyond the
  noise: the step where a 1-step student needs it. Deterministic in rng.
  """
  if model.semantic is None:
    raise ValueError(f'{model.path} has no semantic gradient predictor: run the semantic and latent phases for its '
                     'stage')
  if num_codes < 2:
    raise ValueError(f'num_codes must be >= 2 to compare codes, got {num_codes}')
  run = _sensitivity_fn(_frozen(model.config.model), _frozen(model.config.diffusion),
                        _frozen(model.semantic.config), int(num_samples), int(num_codes))
  semantic_params = sharding.host_local({'predictor': model.semantic.params['predictor'],
                                         'latent': model.semantic.latent_params, 'stats': model.semantic.stats})
  out = run(sharding.host_local(model.params), semantic_params, rng)
  return {k: float(v) for k, v in jax.device_get(out).items()}
