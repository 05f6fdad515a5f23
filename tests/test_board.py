"""TensorBoard beside metrics.jsonl: the event files of a phase hold the same interval-averaged scalars, the sample
grids and the settings as hyper-parameters (read back here with a minimal TFRecord reader, no TensorFlow), and a
loss.png for readers without TensorBoard."""

import glob
import json
import os
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from sferd_jax import pipeline
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
