"""TensorBoard beside metrics.jsonl: the event files of a phase hold the same interval-averaged scalars, the sample
grids and the settings as hyper-parameters (read back here with a minimal TFRecord reader, no TensorFlow), and a
loss.png for readers without TensorBoard."""

import glob
import json
import os
import struct
import tempfile
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from sferd_jax import files
from sferd_jax import pipeline
from sferd_jax.training import board as board_lib
from sferd_jax.training import checkpointing
from sferd_jax.training import loop
import fake_gcs
import tiny


def read_events(folder):
  """Every Event of the event files in `folder`, in file then write order (TFRecord framing: length, its CRC, the
  bytes, their CRC)."""
  events = []
  for path in sorted(glob.glob(os.path.join(folder, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def scalars(events):
  """{tag: [(step, value)]}"""
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField('simple_value'):
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, 'teacher', 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_the_teacher_s_event_files_hold_its_metrics_grids_and_settings(tmp_path):
  every_step = str(tmp_path / 'every_step')
  pipeline.run_phase(tiny.load_config(**{'teacher.log_every': 1}), every_step, 'teacher')
  workdir = str(tmp_path / 'run')  # log_every=2: each line is the mean of two steps
  pipeline.run_phase(tiny.load_config(**{'teacher.sample_every': 2, 'profile_steps': 2}), workdir, 'teacher')

  lines, single = _metrics(workdir), {r['step']: r for r in _metrics(every_step)}
  assert [r['step'] for r in lines] == [2, 4]
  for r in lines:
    np.testing.assert_allclose(r['loss'], (single[r['step'] - 1]['loss'] + single[r['step']]['loss']) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(r['grad_norm'], (single[r['step'] - 1]['grad_norm'] + single[r['step']]['grad_norm'])
                               / 2, rtol=1e-6)
    assert r['learning_rate'] == single[r['step']]['learning_rate']  # the rate at the step, not a mean

  events = read_events(os.path.join(workdir, 'teacher', 'tensorboard'))
  board = scalars(events)
  for key in ('loss', 'grad_norm', 'learning_rate', 'images_per_s'):
    assert [step for step, _ in board[key]] == [2, 4], key
    np.testing.assert_allclose([v for _, v in board[key]], [r[key] for r in lines], rtol=1e-6)
  grids = [(e.step, v.image) for e in events for v in e.summary.value if v.tag == 'samples']
  assert [step for step, _ in grids] == [2, 4] and grids[0][1].encoded_image_string.startswith(b'\x89PNG')
  plugins = {v.metadata.plugin_data.plugin_name for e in events for v in e.summary.value}
  assert 'hparams' in plugins
  hparams = b''.join(v.metadata.plugin_data.content for e in events for v in e.summary.value
                     if v.metadata.plugin_data.plugin_name == 'hparams')
  assert b'optimizer.learning_rate' in hparams and b'batch_size' in hparams
  with open(os.path.join(workdir, 'teacher', 'parameters.txt')) as f:  # clu's parameter overview
    table = f.read()
  assert '| Name' in table and 'Total:' in table
  with open(os.path.join(workdir, 'teacher', 'loss.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # --config.profile_steps=2: a jax.profiler trace for TensorBoard's profile tab, none in the other run.
  traces = glob.glob(os.path.join(workdir, 'teacher', 'tensorboard', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert not os.path.exists(os.path.join(every_step, 'teacher', 'tensorboard', 'plugins'))


def test_a_run_that_fails_after_its_last_step_still_closes_its_board(tmp_path, monkeypatch):
  closes, real_close = [], checkpointing.PhaseCheckpoints.close

  def failing_close(self):  # the checkpoints' last write fails after the last step, with the summary saved
    real_close(self)
    raise OSError('the bucket went away')

  def counted_close(self, real=board_lib.Board.close):
    closes.append(self.writer is not None)
    real(self)

  monkeypatch.setattr(checkpointing.PhaseCheckpoints, 'close', failing_close)
  monkeypatch.setattr(board_lib.Board, 'close', counted_close)
  workdir = str(tmp_path / 'run')
  with pytest.raises(OSError, match='went away'):
    pipeline.run_phase(tiny.load_config(), workdir, 'teacher')
  assert closes == [True]  # closed once, by the run; its event files hold every line
  board = scalars(read_events(os.path.join(workdir, 'teacher', 'tensorboard')))
  assert [step for step, _ in board['loss']] == [2, 4]


def test_tensorboard_files_of_a_bucket_run_are_uploaded_and_leave_no_local_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))  # where files.local_folder makes its folders
  os.makedirs(tempfile.tempdir)
  assert files.local_folder(str(tmp_path / 'run')) == str(tmp_path / 'run')  # a local folder is written in place
  files.upload_folder(str(tmp_path / 'run'), str(tmp_path / 'run'))
  with fake_gcs.bucket() as store:
    phase_dir = 'gs://fake-bucket/run/teacher'
    board = board_lib.Board(phase_dir, resume_step=0, hparams={'phase': 'teacher'})
    board.scalars({'step': 1, 'loss': 0.5})
    phase = types.SimpleNamespace(name='teacher', directory=phase_dir, profile_steps=1,
                                  train_config=types.SimpleNamespace(steps_per_call=1))
    profiler = loop._Profiler(phase, first_step=1)  # pylint: disable=protected-access
    profiler.before(1)
    assert len(os.listdir(tempfile.tempdir)) == 2 and not store.keys('fake-bucket/')  # each writes locally
    profiler.after(1, jnp.ones(4) * 2)  # the last profiled call: the trace is uploaded
    assert len(os.listdir(tempfile.tempdir)) == 1 and store.keys('fake-bucket/run/teacher/tensorboard/plugins/')
    board.close()
    board.close()  # a second close does nothing
    files.copy(os.path.join(phase_dir, board_lib.SUBFOLDER), str(tmp_path / 'downloaded'))
    assert not os.listdir(tempfile.tempdir)
  assert scalars(read_events(str(tmp_path / 'downloaded'))) == {'loss': [(1, 0.5)]}
  assert glob.glob(str(tmp_path / 'downloaded' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
