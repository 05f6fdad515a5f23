"""The public sampling API: `sample(params, rng, ...)` and `load(path)`.

The CLI's sample mode, the notebooks, the training loop's grids and the FID evaluator all call `sample`.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sferd_jax import errors
from sferd_jax import images as images_lib
from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules
from sferd_jax.models import denoiser
from sferd_jax.models import latent
from sferd_jax.models import semantic
from sferd_jax.models import unet
from sferd_jax.sferd import guided_teacher
from sferd_jax.sferd import semantic_predictor
from sferd_jax.training import checkpointing
from sferd_jax.training import sharding

DEFAULT_DIFFUSION = dict(logsnr_min=schedules.LOGSNR_MIN, logsnr_max=schedules.LOGSNR_MAX)


@dataclasses.dataclass(frozen=True)
class SemanticPredictor:
  """A stage's semantic gradient predictor (E_phi, G_tau) and the latent model that samples its codes z_sem."""
  params: Any            # {'encoder': E_phi, 'predictor': G_tau}
  latent_params: Any     # the latent denoiser (MLPSkipNet)
  stats: Any             # {'mean', 'std'} of E_phi's codes over the training set
  # {'semantic': config.sferd.semantic, 'latent': config.sferd.latent, 'latent_num_classes': 0 = unconditional}
  config: ml_collections.ConfigDict

  def with_stop_fraction(self, stop_fraction):
    """The same predictor, sampled with PDAE's switch-off at another fraction (a sampling setting only)."""
    if not 0.0 <= float(stop_fraction) < 1.0:
      raise ValueError(f'stop_fraction must be in [0, 1), got {stop_fraction}')
    config = self.config.to_dict()
    config['semantic']['stop_fraction'] = float(stop_fraction)
    return dataclasses.replace(self, config=ml_collections.ConfigDict(config))


@dataclasses.dataclass(frozen=True)
class Model:
  """A finished, exported model: its parameters and what is needed to sample it."""
  params: Any
  config: ml_collections.ConfigDict   # model (architecture), diffusion, num_steps, phase, stage, ...
  path: str
  semantic: Optional[SemanticPredictor] = None

  @property
  def has_semantic(self):
    return self.semantic is not None

  def sample(self, rng, *, num_samples, num_steps=None, semantic=False, stop_fraction=None, **kwargs):
    """sample() with this model's architecture and, by default, its own step count; semantic=True adds the
    semantic gradient predictor (a code drawn from the latent model), shifting all but the last
    floor(stop_fraction * num_steps) steps (None: the stop_fraction the predictor was exported with)."""
    if semantic and self.semantic is None:
      raise ValueError(f'{self.path} has no semantic gradient predictor: run the semantic and latent phases for '
                       f'its stage (config.phases, config.sferd.semantic.stages)')
    predictor = self.semantic if semantic else None
    if predictor is not None and stop_fraction is not None:
      predictor = predictor.with_stop_fraction(stop_fraction)
    return sample(self.params, rng, model_config=self.config.model, num_samples=num_samples,
                  num_steps=num_steps or self.config.num_steps, diffusion_config=self.config.diffusion,
                  semantic=predictor, **kwargs)


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


def sample_keys(rng, *, num_samples, first_index=0):
  """Keys of samples first_index..first_index+num_samples-1: sample i's key is fold_in(rng, i)."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(first_index, first_index + num_samples))


def initial_noise(rng, *, num_samples, shape, first_index=0):
  """z_1 for samples first_index..first_index+num_samples-1: sample i's noise depends on (rng, i) only."""
  keys = sample_keys(rng, num_samples=num_samples, first_index=first_index)
  return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def sample(params, rng, *, model_config, num_samples, num_steps, labels=None, sampler='ddim', clip_x=True,
           diffusion_config=None, guidance=None, semantic=None, batch_size=256):
  """Draws num_samples images with num_steps steps: uint8 (N, H, W, C).

  Deterministic for a given rng. Sample i starts from noise, and with the semantic predictor draws its code z_sem,
  from keys that depend only on (rng, i), so with the DDIM sampler the first k images do not change with
  num_samples or batch_size. Class-conditional models draw uniform labels from rng for all num_samples at once
  (so there the first k images stay fixed only when `labels` (N,) is given). Batches are sharded over this
  process's devices; params may be global (replicated) arrays of a multi-host job: this process's copy is used.
  guidance: an attention-guidance section (config.sferd.attention_guidance) to sample with the attention-guided
  model (self-attention-guided DDIM), or None.
  semantic: a SemanticPredictor (Model.semantic) to shift the student's x prediction by its semantic gradient
  predictor, with a code per sample drawn from its latent model; None = the plain model.
  """
  if int(num_steps) < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  model_config = ml_collections.ConfigDict(model_config) if not isinstance(model_config,
                                                                           ml_collections.ConfigDict) else model_config
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
  run, mesh = _sampler(_frozen(model_config), _frozen(diffusion_config or DEFAULT_DIFFUSION),
                       _frozen(guidance) if guidance is not None else 'null',
                       _frozen(semantic.config) if semantic is not None else 'null',
                       sampler, bool(clip_x), num_devices)
  semantic_params = None if semantic is None else sharding.put_replicated(sharding.host_local(
      {'predictor': semantic.params['predictor'], 'latent': semantic.latent_params, 'stats': semantic.stats}), mesh)
  shape = (model_config.image_size, model_config.image_size, model_config.channels)
  batch_size = min(batch_size, num_samples)
  batch_size = -(-batch_size // num_devices) * num_devices  # a multiple of the device count
  params = sharding.put_replicated(sharding.host_local(params), mesh)  # global arrays would span other processes
  out = []
  for start in range(0, num_samples, batch_size):
    n = min(batch_size, num_samples - start)
    z = initial_noise(noise_rng, num_samples=batch_size, shape=shape, first_index=start)
    code_keys = None if semantic is None else sample_keys(code_rng, num_samples=batch_size, first_index=start)
    batch_labels = np.zeros((batch_size,), np.int32)
    batch_labels[:n] = labels[start:start + n]
    x = run(params, z, batch_labels, jax.random.fold_in(loop_rng, start), jnp.int32(num_steps), semantic_params,
            code_keys)
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


def in_workdir(path, workdir):
  """A model path as configs give it: None = the workdir itself; relative paths are tried inside the workdir first
  ('teacher', 'distill/stage_3'), then as given."""
  if not path:
    return workdir
  if not os.path.isabs(path) and os.path.exists(os.path.join(workdir, path)):
    return os.path.join(workdir, path)
  return path


def resolve_model_path(path):
  """An export folder, a phase folder (its model/) or a run folder (its last finished stage, else its teacher)."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, 'model')):
    if checkpointing.is_exported(candidate):
      return candidate
  stages_dir = os.path.join(path, 'distill')
  stages = []
  if os.path.isdir(stages_dir):
    for name in os.listdir(stages_dir):
      model_dir = os.path.join(stages_dir, name, 'model')
      if name.startswith('stage_') and name[6:].isdigit() and checkpointing.is_exported(model_dir):
        stages.append((int(name[6:]), model_dir))
  if stages:
    return max(stages)[1]
  teacher = os.path.join(path, 'teacher', 'model')
  if checkpointing.is_exported(teacher):
    return teacher
  raise errors.CheckpointError(
      f'no exported model found at {path}: expected an export (a folder with {checkpointing.MODEL_JSON}), a phase '
      f'folder holding model/, or a run folder with teacher/model or distill/stage_<k>/model. Train one first '
      f'(python -m sferd_jax.main --mode=pipeline ...).')


def abstract_params(model_config):
  """Shapes and dtypes of a U-Net's parameters, without computing them."""
  model = unet.make_unet(model_config)
  return jax.eval_shape(lambda: unet.init_params(model, jax.random.key(0), model_config=model_config))


def load_semantic_params(path, model_config, semantic_config, *, sharding=None):
  """{'encoder', 'predictor'} of an exported semantic phase; sharding as checkpointing.load_tree's."""
  encoder, predictor = semantic.make_semantic_models(model_config, semantic_config)
  like = jax.eval_shape(lambda: semantic.init_semantic_params(encoder, predictor, jax.random.key(0),
                                                              model_config=model_config))
  return checkpointing.load_tree(path, 'params', like, sharding=sharding)


def _load_semantic(stage_root, model_config, *, sharding=None):
  """The SemanticPredictor exported beside a stage's model (stage_<k>/{semantic,latent}/model), or None."""
  semantic_path = os.path.join(stage_root, 'semantic', 'model')
  latent_path = os.path.join(stage_root, 'latent', 'model')
  if not (checkpointing.is_exported(semantic_path) and checkpointing.is_exported(latent_path)):
    return None
  semantic_config = checkpointing.read_info(semantic_path)['semantic']
  latent_info = checkpointing.read_info(latent_path)
  num_classes = int(latent_info.get('num_classes', 0) or 0)  # absent from exports of unconditional latent models
  latent_model = latent.make_latent_model(latent_info['latent'], num_classes=num_classes)
  dim = latent_info['latent_dim']
  latent_like = jax.eval_shape(lambda: latent.init_latent_params(latent_model, jax.random.key(0), dim=dim))
  stats_like = {k: jax.ShapeDtypeStruct((dim,), jnp.float32) for k in ('mean', 'std')}
  return SemanticPredictor(
      params=load_semantic_params(semantic_path, model_config, semantic_config, sharding=sharding),
      latent_params=checkpointing.load_tree(latent_path, 'params', latent_like, sharding=sharding),
      stats=checkpointing.load_tree(latent_path, 'stats', stats_like, sharding=sharding),
      config=ml_collections.ConfigDict({'semantic': semantic_config, 'latent': latent_info['latent'],
                                        'latent_num_classes': num_classes}))


def load(path, *, sharding=None):
  """Loads an exported model (or the last one of a run folder): Model(params, config, path, semantic).

  A distillation stage's semantic gradient predictor and latent model come along when they were trained.
  sharding: of the loaded arrays; None = replicated over this process's devices (see checkpointing.load_tree).
  Every process of a multi-host job must call it: Orbax's restore synchronises them.
  """
  path = resolve_model_path(path)
  config = ml_collections.ConfigDict(checkpointing.read_info(path))
  params = checkpointing.load_tree(path, 'params', abstract_params(config.model), sharding=sharding)
  return Model(params=params, config=config, path=path,
               semantic=_load_semantic(os.path.dirname(path), config.model, sharding=sharding))


def write_samples(config, workdir):
  """The CLI's sample mode: a PNG grid and an .npz of config.sample.num_samples samples."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  model = load(in_workdir(config.sample.model, workdir))
  num_steps = config.sample.num_steps or model.config.num_steps
  guidance = dict(config.sferd.attention_guidance, enabled=True) if config.sample.guidance else None
  semantic = {'semantic': True, 'stop_fraction': config.sferd.semantic.stop_fraction} if config.sample.semantic else {}
  images = model.sample(jax.random.key(config.seed), num_samples=config.sample.num_samples, num_steps=num_steps,
                        sampler=config.sample.sampler, clip_x=config.sample.clip_x, guidance=guidance,
                        batch_size=config.sample.batch_size, **semantic)
  name = (f'{model.config.name}_{num_steps}steps_{config.sample.sampler}' + ('_guided' if guidance else '')
          + ('_semantic' if config.sample.semantic else ''))
  if jax.process_index() != 0:  # every process samples the same images; one writes them
    return images
  out_dir = os.path.join(workdir, 'samples')
  os.makedirs(out_dir, exist_ok=True)
  images_lib.save_grid(os.path.join(out_dir, name + '.png'), images[:256])
  np.savez_compressed(os.path.join(out_dir, name + '.npz'), images=images)
  logging.info('wrote %d samples of %s (%d steps) to %s/%s.{png,npz}', len(images), model.path, num_steps, out_dir,
               name)
  return images
