"""The run folder's layout (one object every reader and writer asks) and the atomic writers."""

import json
import os

import numpy as np
import pytest

from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import files
from sferd_jax import layout


def _fake_export(path):
  os.makedirs(path)
  with open(os.path.join(path, layout.MODEL_JSON), 'w') as f:
    f.write('{}')


def test_paths_are_the_documented_layout():
  run = layout.RunLayout('w')
  assert run.teacher_model == os.path.join('w', 'teacher', 'model')
  assert run.stage_model(3) == os.path.join('w', 'distill', 'stage_3', 'model')
  assert run.semantic_model(3) == os.path.join('w', 'distill', 'stage_3', 'semantic', 'model')
  assert run.latent_model(3) == os.path.join('w', 'distill', 'stage_3', 'latent', 'model')
  assert layout.predictor_exports(run.stage_dir(3)) == (run.semantic_model(3), run.latent_model(3))
  assert run.stage_table == os.path.join('w', 'distill', 'stages')
  assert layout.RunLayout('').classifier_dir == os.path.join('evaluate', 'classifier')  # relative to a run folder


def test_finished_stages_in_numeric_order_and_only_exported_ones(tmp_path):
  run = layout.RunLayout(str(tmp_path))
  assert run.finished_stages() == [] and run.finished_models() == []
  for stage in (10, 2, 1):
    _fake_export(run.stage_model(stage))
  os.makedirs(run.stage_model(11))            # interrupted: no model.json
  os.makedirs(os.path.join(run.distill_dir, 'stage_x'))
  assert run.finished_stages() == [(1, run.stage_model(1)), (2, run.stage_model(2)), (10, run.stage_model(10))]
  _fake_export(run.teacher_model)
  assert run.finished_models() == [run.teacher_model] + [run.stage_model(k) for k in (1, 2, 10)]


def test_resolve_model_path_finds_the_last_stage_a_phase_folder_or_an_export(tmp_path):
  run = layout.RunLayout(str(tmp_path))
  with pytest.raises(errors.CheckpointError, match='no exported model'):
    exports.resolve_model_path(run.workdir)
  _fake_export(run.teacher_model)
  assert exports.resolve_model_path(run.workdir) == run.teacher_model
  _fake_export(run.stage_model(2))
  assert exports.resolve_model_path(run.workdir) == run.stage_model(2)
  assert exports.resolve_model_path(run.teacher_dir) == run.teacher_model
  assert exports.resolve_model_path(run.stage_model(2)) == run.stage_model(2)


def test_atomic_writers_leave_the_whole_file_or_nothing(tmp_path):
  path = str(tmp_path / 'sub' / 'a.json')
  files.write_json_atomic(path, {'a': [1, 2]})
  with open(path) as f:
    assert json.load(f) == {'a': [1, 2]}
  with pytest.raises(KeyError):
    with files.atomic_path(str(tmp_path / 'b.npz')) as tmp:
      np.savez(tmp, x=np.ones(3))
      raise KeyError('killed mid-write')
  with pytest.raises(KeyError):
    with files.atomic_path(str(tmp_path / 'folder')) as tmp:
      os.makedirs(os.path.join(tmp, 'inner'))
      raise KeyError('killed mid-copy')
  assert sorted(os.listdir(tmp_path)) == ['sub']  # no half-written file or folder under any name
  with files.atomic_path(str(tmp_path / 'c.npz')) as tmp:
    assert os.path.basename(tmp).startswith('.') and tmp.endswith('.npz')  # hidden; np.savez keeps the name
    np.savez(tmp, x=np.arange(3))
  with np.load(str(tmp_path / 'c.npz')) as f:
    np.testing.assert_array_equal(f['x'], np.arange(3))
