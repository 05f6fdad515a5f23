"""Orbax checkpoints of a training phase, and the export of a finished model.

A phase (the teacher, one distillation stage, ...) writes `<dir>/checkpoints/<step>/{state,meta}` with an Orbax
CheckpointManager: `state` is the TrainState, `meta` a JSON dict (the config the run was started with, the stage,
a fingerprint of the teacher). A finished phase exports its model to `<dir>/model/`: `params/` (Orbax) and
`model.json`, written last, so an export without model.json is an interrupted one. The next stage and `load()`
read only exports; a student checkpoint never holds its teacher.
"""

import hashlib
import json
import os
import shutil

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from sferd_jax import errors
from sferd_jax.training import sharding as sharding_lib

MODEL_JSON = 'model.json'



def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


class PhaseCheckpoints:
  """The rolling checkpoints of one training phase, for resuming it."""

  def __init__(self, directory, *, keep):
    self.directory = os.path.abspath(os.path.join(directory, 'checkpoints'))
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as e:
      raise errors.CheckpointError(f'cannot create the checkpoint folder {self.directory}: {e}. Choose a --workdir you '
                                   f'can write to.') from None
    if not os.access(self.directory, os.W_OK):
      raise errors.CheckpointError(f'the checkpoint folder {self.directory} is not writable. Choose another --workdir.')
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, meta):
    self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

  def restore_meta(self, step):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None

  def restore(self, step, like_state):
    """Restores the state at `step` into the structure, shapes and shardings of `like_state`."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(like_state)), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    return restored['state'], restored['meta']

  def _unreadable(self, step, error):
    return errors.CheckpointError(
        f'the checkpoint {self.directory}/{step} cannot be restored ({type(error).__name__}: {error}). It is '
        f'corrupt or was written by an incompatible model or version. Move that folder aside to resume from an '
        f'earlier checkpoint, or start afresh in a new --workdir.')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def fingerprint(tree):
  """A short hash of a parameter tree's values, to tell which teacher a student was distilled from."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(sharding_lib.host_local(tree)):  # global arrays too
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.asarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()[:16]


def is_exported(path):
  return os.path.exists(os.path.join(path, MODEL_JSON))


def export_model(path, *, trees, info):
  """Writes a finished model: each of `trees` (e.g. {'params': ...}) as Orbax, then model.json (info).

  Refuses to overwrite an existing export: a finished model is never replaced silently.
  """
  path = os.path.abspath(path)
  if is_exported(path):
    raise errors.CheckpointError(f'{path} already holds an exported model; it is never overwritten. Move it aside or '
                                 f'use a new --workdir.')
  if os.path.exists(path) and jax.process_index() == 0:
    shutil.rmtree(path)  # an export interrupted before model.json was written
  multihost_utils.sync_global_devices(f'export cleared {path}')
  checkpointer = ocp.StandardCheckpointer()
  for name, tree in trees.items():
    checkpointer.save(os.path.join(path, name), tree)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    info = dict(info, trees=sorted(trees))
    tmp = os.path.join(path, MODEL_JSON + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, MODEL_JSON))
  multihost_utils.sync_global_devices(f'exported {path}')  # every process may read it next


def read_info(path):
  """model.json of an exported model, with a clear error when there is none."""
  file = os.path.join(path, MODEL_JSON)
  if not os.path.exists(file):
    what = 'does not exist' if not os.path.exists(path) else f'has no {MODEL_JSON} (not an exported model, or an ' \
                                                             f'export that was interrupted)'
    raise errors.CheckpointError(f'{path} {what}. Point at the model/ folder a finished phase exported, e.g. '
                                 f'<workdir>/teacher/model or <workdir>/distill/stage_<k>/model.')
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f'{file} cannot be read ({e}); the export is corrupt. Re-export it or use another.') from None


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
    return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), name), like)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(f'{path}/{name} cannot be restored ({type(e).__name__}: {e}). The export is corrupt or '
                                 f'its architecture differs from the config it was loaded with.') from None
