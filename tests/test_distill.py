"""Progressive distillation end to end on the tiny config: stages, handoff, one compilation, resume, bad input."""

import json
import os
import re

import jax
import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import layout
from sferd_jax import pipeline
from sferd_jax.training import checkpointing
from sferd_jax.training import phases
import test_training
import tiny


def test_one_compilation_serves_every_stage(tiny_run):
  workdir, traces = tiny_run
  assert len(traces) == 1
  with open(os.path.join(workdir, 'distill', 'stages.json')) as f:
    rows = json.load(f)
  assert [(r['stage'], r['teacher_steps'], r['student_steps']) for r in rows] == [(1, 4, 2), (2, 2, 1)]
  assert rows[0]['compile_s'] > 0 and rows[1]['compile_s'] == 0
  assert all(np.isfinite(r['final_loss']) and r['images_per_s'] > 0 for r in rows)
  with open(os.path.join(workdir, 'distill', 'stages.md')) as f:
    assert f.read().count('\n') == 4


def test_stage_handoff_student_becomes_next_teacher(tiny_run):
  workdir, _ = tiny_run
  stage1 = exports.load(os.path.join(workdir, 'distill', 'stage_1'))
  info2 = exports.read_info(os.path.join(workdir, 'distill', 'stage_2', 'model'))
  assert info2['teacher'] == stage1.path
  assert info2['teacher_fingerprint'] == exports.fingerprint(stage1.params)
  teacher = exports.load(os.path.join(workdir, 'teacher'))
  info1 = exports.read_info(stage1.path)
  assert info1['teacher_fingerprint'] == exports.fingerprint(teacher.params)
  # Stage 1's student started from the teacher and moved away from it.
  assert exports.fingerprint(stage1.params) != exports.fingerprint(teacher.params)


def test_every_stage_loads_and_samples_at_its_own_step_count(tiny_run):
  workdir, _ = tiny_run
  for path, steps in (('teacher', 4), ('distill/stage_1', 2), ('distill/stage_2', 1)):
    model = exports.load(os.path.join(workdir, path))
    assert model.config.num_steps == steps
    images = model.sample(jax.random.key(1), num_samples=2)
    assert images.shape == (2, 8, 8, 1)
  assert exports.load(workdir).config.name == 'stage_2'  # a run folder loads its last stage
  # The comparison grid: the teacher above its students, each row labelled in a margin on the left.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  picture = np.asarray(Image.open(os.path.join(workdir, 'samples', 'comparison.png')).convert('L'))
  grid_width = (8 * (8 + 1) + 1) * 16  # 8 samples of 8x8 with 1-pixel gaps, enlarged 16x
  margin = picture.shape[1] - grid_width
  assert margin > 20 and picture.shape[0] == (3 * (8 + 1) + 1) * 16
  for row in range(3):  # text (dark pixels) in each row's band of the margin
    band = picture[row * 144 + 16:(row + 1) * 144, :margin]
    assert (band < 128).any(), row


def test_distill_kill_and_resume_equals_uninterrupted(tiny_run, tmp_path, monkeypatch):
  """Both runs distil the same exported teacher; one is killed in stage 2 (after its checkpoint at step 2)."""
  workdir, _ = tiny_run
  config = tiny.load_config(**{'distill.teacher': os.path.join(workdir, 'teacher', 'model'),
                               'distill.train_steps': 4, 'distill.checkpoint_every': 2})
  straight = str(tmp_path / 'straight')
  pipeline.run_phase(config, straight, 'distill')
  resumed = str(tmp_path / 'resumed')
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches',
                      lambda *a, **k: test_training._Interrupting(real(*a, **k), after=4, on_call=2))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, resumed, 'distill')
  assert layout.is_exported(os.path.join(resumed, 'distill', 'stage_1', 'model'))
  assert not layout.is_exported(os.path.join(resumed, 'distill', 'stage_2', 'model'))
  monkeypatch.setattr(phases, 'make_batches', real)
  pipeline.run_phase(config, resumed, 'distill')
  for stage in (1, 2):
    a = exports.load(os.path.join(straight, 'distill', f'stage_{stage}'))
    b = exports.load(os.path.join(resumed, 'distill', f'stage_{stage}'))
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  tables = []
  for run in (straight, resumed):
    with open(os.path.join(run, 'distill', 'stages.json')) as f:
      tables.append([(r['stage'], r['student_steps'], r['final_loss']) for r in json.load(f)])
  assert tables[0] == tables[1]


def test_sharded_distill_step_equals_single_device(tiny_run):
  workdir, _ = tiny_run
  config = tiny.load_config()
  teacher = exports.load(os.path.join(workdir, 'teacher')).params
  spec = phases.build(config, 'distill')
  batch = phases.make_batches(config, spec).get(0, 2)
  (one, m1), (four, m4) = (tiny.run_step_on(devices, spec.step, lambda: spec.init(teacher), batch,
                                            (teacher, np.int32(2)))
                           for devices in (jax.devices()[:1], jax.devices()))
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one.params, four.params)


def test_bad_distillation_input_fails_before_any_work(tiny_run, tmp_path):
  workdir, _ = tiny_run
  with pytest.raises(errors.ConfigError, match='power-of-two multiple'):
    config_lib.validate(tiny.load_config(**{'distill.start_num_steps': 12, 'distill.end_num_steps': 1}))
  with pytest.raises(errors.ConfigError, match='power-of-two multiple'):
    config_lib.validate(tiny.load_config(**{'distill.start_num_steps': 2, 'distill.end_num_steps': 4}))
  config_lib.validate(tiny.load_config(**{'distill.start_num_steps': 8, 'distill.end_num_steps': 2}))
  missing = tiny.load_config(**{'phases': ('distill',)})
  with pytest.raises(errors.CheckpointError, match='no teacher to distil'):
    pipeline.run_pipeline(missing, str(tmp_path / 'empty'))
  other = tiny.load_config(**{'distill.teacher': os.path.join(workdir, 'teacher', 'model'), 'model.ch': 32})
  with pytest.raises(errors.IncompatibleRunError, match="architecture differs.*'model.ch': \\(16, 32\\)"):
    pipeline.run_phase(other, str(tmp_path / 'other'), 'distill')
  schedule = tiny.load_config(**{'distill.teacher': os.path.join(workdir, 'teacher', 'model'),
                                 'diffusion.logsnr_min': -10.0})
  with pytest.raises(errors.IncompatibleRunError, match="'diffusion.logsnr_min': \\(-20.0, -10.0\\)"):
    pipeline.run_phase(schedule, str(tmp_path / 'other'), 'distill')
  assert not os.path.exists(tmp_path / 'other' / 'distill')


def test_resume_with_other_guidance_or_optimiser_settings_is_refused(tiny_run, tmp_path, monkeypatch):
  """A stage's checkpoints record the guidance and training settings its target and updates used."""
  workdir, _ = tiny_run
  guided = {'distill.teacher': os.path.join(workdir, 'teacher', 'model'), 'distill.train_steps': 4,
            'distill.checkpoint_every': 1, 'sferd.attention_guidance.enabled': True}
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: test_training._Interrupting(real(*a, **k), after=3))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(tiny.load_config(**guided), str(tmp_path), 'distill')  # stage 1's last checkpoint is step 1
  monkeypatch.setattr(phases, 'make_batches', real)
  for key, value, shown in (('sferd.attention_guidance.weight', 0.5, 'sferd.attention_guidance.weight: saved 0.3'),
                            ('sferd.attention_guidance.enabled', False, 'sferd.attention_guidance: saved {'),
                            ('distill.optimizer.learning_rate', 1e-3, 'distill.optimizer.learning_rate: saved 0.0001'),
                            ('distill.batch_size', 16, 'distill.batch_size: saved 8, now 16')):
    with pytest.raises(errors.IncompatibleRunError, match=f'(?s)stage 1.*{re.escape(shown)}.*allow_changes'):
      pipeline.run_phase(tiny.load_config(**{**guided, key: value}), str(tmp_path), 'distill')
  meta = checkpointing.PhaseCheckpoints(os.path.join(tmp_path, 'distill', 'stage_1'), keep=1).restore_meta(1)
  assert meta['config']['attention_guidance']['weight'] == 0.3
  assert 'log_every' not in meta['config']['training'] and meta['config']['training']['train_steps'] == 4
  # Guidance off records no settings: its weight cannot matter then.
  assert phases.guidance_meta(tiny.load_config()) is None
  assert phases.guidance_meta(tiny.load_config(**{**guided, 'sferd.attention_guidance.weight': 0.0})) is None
