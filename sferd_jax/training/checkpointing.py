"""The rolling Orbax checkpoints of a training phase, for resuming it (exports.py writes the finished model).

A phase (the teacher, one distillation stage, ...) writes `<dir>/checkpoints/<step>/{state,meta}` with an Orbax
CheckpointManager: `state` is the TrainState, `meta` a JSON dict (the config the run was started with, the stage,
a fingerprint of the teacher, and the fingerprint of the state itself, so that a restore can tell a corrupt
checkpoint from a good one). A corrupt checkpoint is moved to `<dir>/corrupt_checkpoints/`, never deleted, and the
phase resumes from the newest good one.
"""

import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import files


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


class PhaseCheckpoints:
  """The rolling checkpoints of one training phase, for resuming it."""

  def __init__(self, directory, *, keep):
    self.directory = files.absolute(os.path.join(directory, 'checkpoints'))
    try:
      files.makedirs(self.directory)
    except OSError as e:
      raise errors.CheckpointError(f'cannot create the checkpoint folder {self.directory}: {e}. Choose a --workdir you '
                                   f'can write to.') from None
    if not files.is_remote(self.directory) and not os.access(self.directory, os.W_OK):
      raise errors.CheckpointError(f'the checkpoint folder {self.directory} is not writable. Choose another '
                                   f'--workdir.')
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, meta):
    """Saves state with meta and the state's fingerprint; a state holding NaN or Inf is never saved."""
    fingerprint, nonfinite = exports.digest(state)
    if nonfinite:
      raise errors.TrainingDivergedError(f'{self.directory}: the state at step {step} holds NaN or Inf in '
                                         f'{nonfinite[:5]}; not saved. The last good checkpoint is kept.')
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, state_fingerprint=fingerprint))),
                      force=True)

  def restore_latest(self, like_state, *, check):
    """(state, meta) of the newest checkpoint that reads back whole: its record readable, its values matching the
    fingerprint saved with them (checkpoints from before fingerprints: all finite). Each bad one on the way is set
    aside with a warning. check(meta) runs on each record first: a checkpoint of other settings is not corrupt,
    and its error propagates. (None, None) when there is no checkpoint; a CheckpointError when there were some
    but none restored (then the next run starts the phase afresh: a restore that fails for another reason than
    corruption must not silently restart a run)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        check(self.restore_meta(step))
        state, meta = self.restore(step, like_state)
      except errors.CheckpointError as e:
        self._set_aside(step, str(e))
        continue
      found, nonfinite = exports.digest(state)
      expected = meta.get('state_fingerprint')
      if (expected and found != expected) or nonfinite:
        self._set_aside(step, f'its values do not match the fingerprint saved with them ({found} != {expected})'
                        if expected and found != expected else f'it holds NaN or Inf in {nonfinite[:5]}')
        continue
      return state, meta
    if steps:
      raise errors.CheckpointError(
          f'no checkpoint in {self.directory} restores: {steps} were moved to '
          f'{os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")} (the warnings above say why). '
          f'Run the same command again to train this phase from its start, or move them back if they are good and '
          f'the code or config that reads them changed.')
    return None, None

  def _set_aside(self, step, why):
    """Moves a bad checkpoint to <phase>/corrupt_checkpoints/<step>_<time> (never deletes it)."""
    aside = os.path.join(os.path.dirname(self.directory), 'corrupt_checkpoints', f'{step}_{int(time.time())}')
    if jax.process_index() == 0:
      files.move(os.path.join(self.directory, str(step)), aside)
    multihost_utils.sync_global_devices(f'set aside {self.directory}/{step}')
    logging.warning('the checkpoint %s/%d is corrupt (%s); moved it to %s; trying an earlier one', self.directory,
                    step, why, aside)
    self.manager.reload()

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
        f'the checkpoint {self.directory}/{step} cannot be restored ({type(error).__name__}: {error}): it is '
        f'corrupt or was written by an incompatible model or version')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

