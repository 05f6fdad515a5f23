"""TensorBoard event files of a phase folder (<phase>/tensorboard/), beside metrics.jsonl: the same interval-averaged
scalars, the sample grids, and the phase's training settings as hyper-parameters. Written by process 0 with
tensorboardX, which needs no TensorFlow. Where tensorboardX is not installed, nothing is written and metrics.jsonl
still holds every number.

  tensorboard --logdir <workdir>     # runs: teacher/tensorboard, distill/stage_<k>/tensorboard, ...
"""

import os

from absl import logging
import numpy as np

from sferd_jax import files

SUBFOLDER = 'tensorboard'


def _flat(prefix, value):
  """{dotted key: bool/int/float/str} of a nested settings dict (what the hparams dashboard takes)."""
  if isinstance(value, dict):
    return {k: v for key, item in value.items() for k, v in _flat(f'{prefix}{key}.', item).items()}
  if isinstance(value, (bool, int, float, str)):
    return {prefix.rstrip('.'): value}
  return {prefix.rstrip('.'): str(value)}


class Board:
  """One phase's event files. On a resume, TensorBoard is told to drop what the killed run logged after the
  checkpoint (purge_step), as metrics.jsonl drops those lines. A bucket run folder gets them at close()."""

  def __init__(self, phase_dir, *, resume_step, hparams, enabled=True):
    self.writer, self.destination = None, os.path.join(phase_dir, SUBFOLDER)
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.info('tensorboardX is not installed: no TensorBoard event files (metrics.jsonl has every number)')
      return
    self.local = files.local_folder(self.destination)
    self.writer = SummaryWriter(logdir=self.local, purge_step=resume_step or None, flush_secs=30)
    settings = _flat('', hparams)
    for event in summary.hparams(settings, {'loss': None}):  # the dashboard lists 'loss' beside the settings
      self.writer.file_writer.add_summary(event)

  def scalars(self, record):
    if self.writer:
      for key, value in record.items():
        if key != 'step':
          self.writer.add_scalar(key, value, record['step'])

  def image(self, tag, image, step):
    """A (H, W, C) uint8 image (a sample grid)."""
    if self.writer:
      image = np.asarray(image)
      self.writer.add_image(tag, image[..., :3] if image.shape[-1] >= 3 else np.repeat(image, 3, -1), step,
                            dataformats='HWC')

  def close(self):
    """Flushes the event files (and uploads them to a bucket run folder); a second call does nothing."""
    if not self.writer:
      return
    writer, self.writer = self.writer, None
    try:
      writer.close()
    finally:
      files.upload_folder(self.local, self.destination)
