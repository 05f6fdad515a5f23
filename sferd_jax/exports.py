"""Exported models: writing one when a phase finishes, and `load(path)` -> Model for everything that reads one.

An export is a folder `model/` holding `params/` (and any other trees, e.g. the latent model's code statistics) as
Orbax checkpoints and `model.json`, written last: an export without model.json is an interrupted one. The next
stage, `load()`, sampling and evaluation read only exports; a student's export never holds its teacher.
"""

import dataclasses
import hashlib
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sferd_jax import errors
from sferd_jax import files
from sferd_jax import layout
from sferd_jax.models import latent
from sferd_jax.models import semantic
from sferd_jax.models import unet
from sferd_jax import sampling
from sferd_jax import sharding as sharding_lib


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
    return sampling.sample(self.params, rng, model_config=self.config.model, num_samples=num_samples,
                           num_steps=num_steps or self.config.num_steps, diffusion_config=self.config.diffusion,
                           semantic=predictor, **kwargs)


# What an export's model.json must hold for load() and the next phase to use it, by the phase that wrote it.
REQUIRED_INFO = {'teacher': ('model', 'diffusion', 'num_steps'),
                 'distill': ('model', 'diffusion', 'num_steps', 'stage'),
                 'consistency': ('model', 'diffusion', 'num_steps'),
                 'semantic': ('semantic', 'stage'), 'latent': ('latent', 'latent_dim')}


def digest(tree):
  """(fingerprint, [paths of leaves holding NaN or Inf]) of a tree's values, in one pass over them.

  The fingerprint is a short hash of every leaf's path and bytes: it tells which teacher a student was distilled
  from, and that a checkpoint or export reads back as it was written.
  """
  hasher, nonfinite = hashlib.sha256(), []
  for path, leaf in jax.tree_util.tree_leaves_with_path(sharding_lib.host_local(tree)):  # global arrays too
    value = np.asarray(jax.device_get(leaf))
    hasher.update(jax.tree_util.keystr(path).encode())
    hasher.update(value.tobytes())
    if jnp.issubdtype(value.dtype, jnp.inexact) and not np.all(np.isfinite(value)):  # bfloat16 too
      nonfinite.append(jax.tree_util.keystr(path))
  return hasher.hexdigest()[:16], nonfinite


def fingerprint(tree):
  """digest(tree)'s fingerprint."""
  return digest(tree)[0]


def export_model(path, *, trees, info):
  """Writes a finished model: each of `trees` (e.g. {'params': ...}) as Orbax, then model.json (info).

  Refuses to overwrite an existing export: a finished model is never replaced silently.
  """
  path = files.absolute(path)
  if layout.is_exported(path):
    raise errors.CheckpointError(f'{path} already holds an exported model; it is never overwritten. Move it aside or '
                                 f'use a new --workdir.')
  if files.exists(path) and jax.process_index() == 0:
    files.remove(path)  # an export interrupted before model.json was written
  multihost_utils.sync_global_devices(f'export cleared {path}')
  fingerprints = {}
  for name, tree in trees.items():
    fingerprints[name], nonfinite = digest(tree)
    if nonfinite:  # never export what cannot sample
      raise errors.TrainingDivergedError(f'{path}: not exported: {name} holds NaN or Inf in {nonfinite[:5]}. The '
                                         f'training diverged; see the phase\'s metrics.jsonl.')
  checkpointer = ocp.StandardCheckpointer()
  for name, tree in trees.items():
    checkpointer.save(os.path.join(path, name), tree)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:  # the fingerprints let load() tell a corrupt export from a good one
    files.write_json_atomic(os.path.join(path, layout.MODEL_JSON),
                            dict(info, trees=sorted(trees), fingerprints=fingerprints), sort_keys=True)
  multihost_utils.sync_global_devices(f'exported {path}')  # every process may read it next


def read_info(path):
  """model.json of an exported model, with a clear error when there is none."""
  file = os.path.join(path, layout.MODEL_JSON)
  if not files.exists(file):
    what = ('does not exist' if not files.exists(path) else
            f'has no {layout.MODEL_JSON} (not an exported model, or an export that was interrupted)')
    raise errors.CheckpointError(f'{path} {what}. Point at the model/ folder a finished phase exported, e.g. '
                                 f'<workdir>/teacher/model or <workdir>/distill/stage_<k>/model.')
  try:
    info = files.read_json(file)
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f'{file} cannot be read ({e}); the export is corrupt. {rebuild_advice(path)}') \
        from None
  missing = (['phase'] if not isinstance(info, dict) or 'phase' not in info
             else [k for k in REQUIRED_INFO.get(info['phase'], ()) if k not in info])
  if missing:
    raise errors.CheckpointError(f'{file} lacks {missing}: the export is corrupt or was not written by sferd_jax. '
                                 f'{rebuild_advice(path)}')
  return info


def rebuild_advice(path):
  """How to rebuild a corrupt export: its phase re-exports it from its final checkpoint."""
  return (f'Rebuild it: move {path} aside and run the same command again (the phase that wrote it exports again '
          f'from its last checkpoint, or trains again if that is gone).')


def _reader(sharding):
  """An Orbax checkpointer for a restore into `sharding`. A restore onto this process's own devices involves this
  process alone (its barriers too), so one process of a multi-host job can load a model by itself (the evaluation,
  the sample grids); one into a mesh of several processes synchronises them all."""
  if jax.process_count() == 1 or not sharding.is_fully_addressable:
    return ocp.StandardCheckpointer()
  process = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=process, active_processes={process}, barrier_sync_key_prefix=f'load_on_process_{process}'))


def load_tree(path, name, like, *, sharding=None):
  """Restores tree `name` of an export into the shapes of `like` (a tree of arrays or ShapeDtypeStructs).

  Leaves without a sharding get `sharding`; by default, replicated over this process's own devices, whatever the
  device count of the run that saved them: a model trained on 8 GPUs loads on a laptop, and one process of a
  multi-host job can sample alone. Training passes its mesh's replicated sharding for arrays that enter its steps.
  """
  if sharding is None:
    sharding = sharding_lib.replicated(sharding_lib.make_mesh(jax.local_devices()))
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=getattr(x, 'sharding', None) or sharding), like)
  try:
    tree = _reader(sharding).restore(os.path.join(files.absolute(path), name), like)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(f'{path}/{name} cannot be restored ({type(e).__name__}: {e}). Either its '
                                 f'architecture differs from the config it was loaded with (load it with the config '
                                 f'it was trained with), or it is corrupt: {rebuild_advice(path)}') from None
  found, nonfinite = digest(tree)
  expected = read_info(path).get('fingerprints', {}).get(name)  # exports before fingerprints: values checked only
  if (expected and found != expected) or nonfinite:
    why = (f'its values do not match the fingerprint recorded when it was exported ({found} != {expected})'
           if expected and found != expected else f'it holds NaN or Inf in {nonfinite[:5]}')
    raise errors.CheckpointError(f'{path}/{name} is corrupt: {why}. {rebuild_advice(path)}')
  return tree


def in_workdir(path, workdir):
  """A model path as configs give it: None = the workdir itself; relative paths are tried inside the workdir first
  ('teacher', 'distill/stage_3'), then as given."""
  if not path:
    return workdir
  if not os.path.isabs(path) and not files.is_remote(path) and files.exists(os.path.join(workdir, path)):
    return os.path.join(workdir, path)
  return path


def resolve_model_path(path):
  """An export folder, a phase folder (its model/) or a run folder (its last finished stage, else its consistency
  model, else its teacher)."""
  path = files.absolute(path)
  for candidate in (path, layout.export_of(path)):
    if layout.is_exported(candidate):
      return candidate
  run = layout.RunLayout(path)
  stages = run.finished_stages()
  if stages:
    return stages[-1][1]
  models = run.finished_models()  # the consistency model, else the teacher
  if models:
    return models[-1]
  raise errors.CheckpointError(
      f'no exported model found at {path}: expected an export (a folder with {layout.MODEL_JSON}), a phase '
      f'folder holding model/, or a run folder with teacher/model or distill/stage_<k>/model. Train one first '
      f'(python -m sferd_jax.main --mode=pipeline ...).')


def abstract_params(model_config):
  """Shapes and dtypes of a U-Net's parameters, without computing them."""
  model = unet.make_unet(model_config)
  return jax.eval_shape(lambda: unet.init_params(model, jax.random.key(0), model_config=model_config))


def load_semantic_params(path, model_config, semantic_config, *, sharding=None):
  """{'encoder', 'predictor'} of an exported semantic phase; sharding as load_tree's."""
  encoder, predictor = semantic.make_semantic_models(model_config, semantic_config)
  like = jax.eval_shape(lambda: semantic.init_semantic_params(encoder, predictor, jax.random.key(0),
                                                              model_config=model_config))
  return load_tree(path, 'params', like, sharding=sharding)


def _load_semantic(stage_root, model_config, *, sharding=None):
  """The SemanticPredictor exported beside a stage's model (stage_<k>/{semantic,latent}/model), or None."""
  semantic_path, latent_path = layout.predictor_exports(stage_root)
  if not (layout.is_exported(semantic_path) and layout.is_exported(latent_path)):
    return None
  semantic_config = read_info(semantic_path)['semantic']
  latent_info = read_info(latent_path)
  num_classes = int(latent_info.get('num_classes', 0) or 0)  # absent from exports of unconditional latent models
  latent_model = latent.make_latent_model(latent_info['latent'], num_classes=num_classes)
  dim = latent_info['latent_dim']
  latent_like = jax.eval_shape(lambda: latent.init_latent_params(latent_model, jax.random.key(0), dim=dim))
  stats_like = {k: jax.ShapeDtypeStruct((dim,), jnp.float32) for k in ('mean', 'std')}
  return SemanticPredictor(
      params=load_semantic_params(semantic_path, model_config, semantic_config, sharding=sharding),
      latent_params=load_tree(latent_path, 'params', latent_like, sharding=sharding),
      stats=load_tree(latent_path, 'stats', stats_like, sharding=sharding),
      config=ml_collections.ConfigDict({'semantic': semantic_config, 'latent': latent_info['latent'],
                                        'latent_num_classes': num_classes}))


def load(path, *, sharding=None):
  """Loads an exported model (or the last one of a run folder): Model(params, config, path, semantic).

  A distillation stage's semantic gradient predictor and latent model come along when they were trained.
  sharding: of the loaded arrays; None = replicated over this process's devices (see load_tree).
  With the default sharding a process loads alone; with a mesh over several processes (training's), every process
  of the job must call it.
  """
  path = resolve_model_path(path)
  config = ml_collections.ConfigDict(read_info(path))
  params = load_tree(path, 'params', abstract_params(config.model), sharding=sharding)
  return Model(params=params, config=config, path=path,
               semantic=_load_semantic(os.path.dirname(path), config.model, sharding=sharding))
