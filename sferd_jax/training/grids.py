"""The sample grids a training phase writes as it goes: params -> uint8 images, with fixed keys so the grids of
successive steps are comparable."""

import jax
import ml_collections
import numpy as np

from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules
from sferd_jax import exports
from sferd_jax import images as images_lib
from sferd_jax.models import denoiser
from sferd_jax.models import semantic as semantic_lib
from sferd_jax.models import unet
from sferd_jax import sampling
from sferd_jax.sferd import semantic_predictor
from sferd_jax import sharding

GRID_SAMPLES = 64
TEACHER_GRID_STEPS = 128  # teacher grids show the base model well sampled, at a fixed cost per grid


def grid_sampler(config, num_steps, *, model_config=None):
  """Teacher and distillation grids: GRID_SAMPLES samples of the model being trained, at num_steps steps, with its
  own sampler. model_config: the trained model's when it is not config.model (a consistency model's)."""
  def sample_fn(params):
    return sampling.sample(params, jax.random.key(config.seed), model_config=model_config or config.model,
                           num_samples=GRID_SAMPLES, num_steps=num_steps, diffusion_config=config.diffusion.to_dict())
  return sample_fn


def reconstruction_sampler(config, student, batch, *, num_images=8):
  """Semantic-phase grids: real images (top row) and the shifted student's samples from z_sem = E_phi(them).

  The student starts from noise; only the code carries the image, so resemblance shows what G_tau has learnt.
  """
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  gradient_param = semantic_predictor.setting(config.sferd.semantic, 'gradient_param')
  x0, labels = batch['image'][0, :num_images], batch['label'][0, :num_images]
  labels = denoiser.labels_or_none(config.model, labels)
  z = jax.random.normal(jax.random.key(config.seed), x0.shape)
  diffusion_config = config.diffusion.to_dict()
  student_params = sharding.host_local(student.params)  # grids run on one process's devices

  @jax.jit
  def run(semantic_params, student_params):
    z_sem = encoder.apply({'params': semantic_params['encoder']}, x0)
    denoise = semantic_predictor.shifted_denoise_fn(
        student=unet.make_unet(config.model), student_params=student_params,
        output_type=student.config.model.output_type,
        predictor=predictor, predictor_params=semantic_params['predictor'], z_sem=z_sem,
        gradient_param=gradient_param, labels=labels, num_steps=student.config.num_steps,
        stop_fraction=semantic_predictor.setting(config.sferd.semantic, 'stop_fraction'),
        logsnr_fn=lambda t: schedules.cosine_logsnr(t, **diffusion_config))
    return samplers.sample_loop(denoise_fn=denoise, z_init=z, num_steps=student.config.num_steps,
                                rng=jax.random.key(config.seed),
                                sampler=sampling.resolve_sampler(student.config.model, 'auto'), **diffusion_config)

  return lambda params: np.concatenate([images_lib.to_uint8(x0), images_lib.to_uint8(run(params, student_params))])


def semantic_sampler(config, student, semantic_params, stats):
  """Latent-phase grids: the student with its predictor and codes drawn from the latent model being trained."""
  def sample_fn(latent_params):
    predictor = exports.SemanticPredictor(
        params=semantic_params, latent_params=latent_params, stats={'mean': stats.mean, 'std': stats.std},
        config=ml_collections.ConfigDict({'semantic': config.sferd.semantic.to_dict(),
                                          'latent': config.sferd.latent.to_dict(),
                                          'latent_num_classes': int(config.model.num_classes)}))
    return sampling.sample(student.params, jax.random.key(config.seed), model_config=student.config.model,
                           num_samples=GRID_SAMPLES, num_steps=student.config.num_steps,
                           diffusion_config=config.diffusion.to_dict(), semantic=predictor)
  return sample_fn
