"""The rolling Orbax checkpoints of a training phase, for resuming it (exports.py writes the finished model).

A phase (the teacher, one distillation stage, ...) writes `<dir>/checkpoints/<step>/{state,meta}` with an Orbax
CheckpointManager: `state` is the TrainState, `meta` a JSON dict (the config the run was started with, the stage,
a fingerprint of the teacher).
"""

import os

import jax
import orbax.checkpoint as ocp

from sferd_jax import errors


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
      raise errors.CheckpointError(f'the checkpoint folder {self.directory} is not writable. Choose another '
                                   f'--workdir.')
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

