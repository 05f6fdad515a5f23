"""The phases of a run, in order: teacher -> distillation stages -> ... Each phase resumes or skips when done.

Layout of a run folder (--workdir):
  teacher/                   checkpoints/, samples/, metrics.jsonl, summary.json, model/ (the exported teacher)
  distill/stage_<k>/         the same, per distillation stage; model/ is the stage's student
"""

import os

import jax
from absl import logging

from sferd_jax import config as config_lib
from sferd_jax import data as data_lib
from sferd_jax import sampling
from sferd_jax.models import unet
from sferd_jax.training import checkpointing
from sferd_jax.training import loop
from sferd_jax.training import sharding
from sferd_jax.training import state as state_lib
from sferd_jax.training import steps as steps_lib

GRID_SAMPLES = 64


def data_config(config):
  """The data section plus the image shape, which the model section owns."""
  return dict(config.data.to_dict(), image_size=config.model.image_size, channels=config.model.channels)


def make_batches(config, train_config, *, seed_offset=0):
  source = data_lib.load_source(data_config(config))
  logging.info('data: %s', source)
  return data_lib.Batches(source, global_batch_size=train_config.batch_size, seed=config.seed + seed_offset,
                          random_flip=config.data.random_flip)


def grid_sampler(config, num_steps):
  """params -> uint8 grid samples, with a fixed key so grids of successive steps are comparable."""
  def sample_fn(params):
    return sampling.sample(params, jax.random.key(config.seed), model_config=config.model,
                           num_samples=GRID_SAMPLES, num_steps=num_steps, diffusion_config=config.diffusion.to_dict())
  return sample_fn


def model_info(config, *, name, phase, num_steps, **extra):
  """model.json of an export: what load() and the next stage need to know."""
  return dict(name=name, phase=phase, num_steps=num_steps, model=config.model.to_dict(),
              diffusion=config.diffusion.to_dict(), **extra)


def check_architecture(export_path, config):
  """An exported model must have the architecture of config.model, or nothing downstream can use it."""
  saved, wanted = checkpointing.read_info(export_path)['model'], config_lib.to_json(config.model)
  if saved != wanted:
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    raise loop.IncompatibleRunError(
        f'{export_path} holds a model whose architecture differs from config.model (key: (saved, config)): {diff}. '
        f'Use a new --workdir, or set config.model to the saved architecture.')


def init_fn(config, train_config, tx, *, params=None):
  """() -> TrainState: from the given params (a teacher's), or freshly initialised."""
  model = unet.make_unet(config.model)

  def init():
    p = params if params is not None else unet.init_params(model, jax.random.key(config.seed),
                                                           model_config=config.model)
    return state_lib.TrainState.create(params=p, tx=tx, ema_decay=train_config.ema_decay)

  return init


def run_teacher(config, workdir, *, mesh=None):
  """Trains (or resumes) the base model and exports it to <workdir>/teacher/model. Returns the export path."""
  directory = os.path.join(workdir, 'teacher')
  export_path = os.path.join(directory, 'model')
  if checkpointing.is_exported(export_path):
    check_architecture(export_path, config)
    logging.info('teacher: finished and exported at %s; skipping', export_path)
    return export_path
  mesh = mesh or sharding.make_mesh()
  train_config = config.teacher
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, train_config.train_steps)
  model = unet.make_unet(config.model)
  phase = loop.Phase(
      name='teacher', directory=directory, train_config=train_config,
      step=steps_lib.make_teacher_step(model=model, model_config=config.model,
                                       diffusion_config=config.diffusion.to_dict(), train_config=train_config,
                                       tx=tx, schedule=schedule),
      init_state=init_fn(config, train_config, tx),
      meta=dict(model=config.model.to_dict(), diffusion=config.diffusion.to_dict(), data=data_config(config),
                seed=config.seed, loss=train_config.loss),
      sample_fn=grid_sampler(config, config.distill.start_num_steps))
  state, summary = loop.run_phase(phase, batches=make_batches(config, train_config), mesh=mesh,
                                  rng=jax.random.key(config.seed))
  checkpointing.export_model(export_path, trees={'params': state.export_params},
                             info=model_info(config, name='teacher', phase='teacher',
                                             num_steps=config.distill.start_num_steps, summary=summary))
  logging.info('teacher: exported to %s', export_path)
  return export_path


def run_pipeline(config, workdir):
  """Runs every phase in config.phases, in order, skipping finished ones."""
  mesh = sharding.make_mesh()
  runners = {'teacher': run_teacher}
  for phase in config.phases:
    if phase not in runners:
      raise config_lib.ConfigError(f'config.phases: phase {phase!r} is not available in this version')
    runners[phase](config, workdir, mesh=mesh)
