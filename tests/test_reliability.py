"""Faults and bad input, tried as a user meets them: corrupt the bytes, start the run, read the outcome. Nothing
trained is lost or silently wrong: corruption is detected (and a checkpoint falls back), a run folder knows what it
was trained on, one run holds a folder at a time, and every user error is one line."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import files
from sferd_jax import pipeline
from sferd_jax.data import codes as codes_lib
from sferd_jax.training import checkpointing
from sferd_jax.training import phases
import test_cli
import test_training
import tiny


def _kill_phase(monkeypatch, name, after):
  """phases.make_batches of phase `name` gets killed at its batch `after`; other phases run as usual."""
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches',
                      lambda config, spec: test_training._Interrupting(real(config, spec), after) if spec.name == name
                      else real(config, spec))
  return real


def _same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, exports.load(a).params, exports.load(b).params)


def _data_files(folder):
  """Orbax's data files (OCDBT's d/ folders: array chunks and B-tree nodes) under a checkpoint or export folder."""
  return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
          if os.path.basename(root) == 'd']


def _scribble(folder, *, size=1024, seed=0):
  """Writes `size` random bytes at 7 places spread over each data file of `folder`, as a failing disk or a stray
  write would. Spread over every file, not one spot of one file: a data file may also hold bytes no array refers
  to (one spot there changes nothing a restore reads)."""
  rng = np.random.default_rng(seed)
  for path in _data_files(folder):
    length = os.path.getsize(path)
    with open(path, 'r+b') as f:
      for k in range(1, 8):
        f.seek(max(0, length * k // 8 - size // 2))
        f.write(rng.integers(0, 256, min(size, length), dtype=np.uint8).tobytes())


@pytest.fixture(scope='module')
def straight_teacher(tmp_path_factory):
  """The tiny teacher, trained without interruption: what every recovered run must reproduce bit for bit."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  pipeline.run_phase(tiny.load_config(), workdir, 'teacher')
  return workdir


# Integrity.


def test_random_bytes_in_the_latest_checkpoint_fall_back_to_the_previous_one(tmp_path, straight_teacher):
  """The trial: 1 KiB of random bytes in the last checkpoint's data, and the run killed before its export. The run
  notices, keeps the bad checkpoint aside, resumes from the one before and exports what the straight run did."""
  config = tiny.load_config()
  workdir = str(tmp_path)
  pipeline.run_phase(config, workdir, 'teacher')
  shutil.rmtree(os.path.join(workdir, 'teacher', 'model'))  # killed between the last checkpoint and the export
  _scribble(os.path.join(workdir, 'teacher', 'checkpoints', '4', 'state'))
  pipeline.run_phase(config, workdir, 'teacher')
  aside = os.listdir(os.path.join(workdir, 'teacher', 'corrupt_checkpoints'))
  assert [name.split('_')[0] for name in aside] == ['4']
  _same_params(straight_teacher, workdir)


def test_a_state_fingerprint_mismatch_is_caught_even_when_orbax_reads_the_bytes(tmp_path, straight_teacher,
                                                                                 monkeypatch):
  """A checkpoint that restores without an error but with other values (what the trial's garbage did) is set
  aside like an unreadable one."""
  config = tiny.load_config()
  _kill_phase(monkeypatch, 'teacher', after=4)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, str(tmp_path), 'teacher')  # the last checkpoint is step 2
  monkeypatch.undo()
  real_restore = checkpointing.PhaseCheckpoints.restore

  def garbled(self, step, like_state):
    state, meta = real_restore(self, step, like_state)
    return jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x, state), meta

  monkeypatch.setattr(checkpointing.PhaseCheckpoints, 'restore', garbled)
  with pytest.raises(errors.CheckpointError, match='no checkpoint'):
    pipeline.run_phase(config, str(tmp_path), 'teacher')
  monkeypatch.undo()
  pipeline.run_phase(config, str(tmp_path), 'teacher')  # afresh: the garbled checkpoint is aside
  aside = os.listdir(os.path.join(tmp_path, 'teacher', 'corrupt_checkpoints'))
  assert [name.split('_')[0] for name in aside] == ['2']
  _same_params(straight_teacher, str(tmp_path))  # trained again from step 0, not from the garbled values


def test_a_corrupt_export_is_an_error_that_names_the_file_and_the_rebuild(tmp_path, straight_teacher):
  export = str(tmp_path / 'model')
  shutil.copytree(os.path.join(straight_teacher, 'teacher', 'model'), export)
  _scribble(os.path.join(export, 'params'))
  with pytest.raises(errors.CheckpointError, match=r'(?s)model/params (is corrupt|cannot be restored).*Rebuild it'):
    exports.load(export)


def test_a_corrupt_semantic_export_is_caught_when_its_student_loads(tmp_path, tiny_run):
  """The trial's second case: a predictor's export with garbled values loaded without complaint."""
  workdir, _ = tiny_run
  stage = str(tmp_path / 'stage_2')
  shutil.copytree(os.path.join(workdir, 'distill', 'stage_2'), stage)
  _scribble(os.path.join(stage, 'semantic', 'model', 'params'))
  with pytest.raises(errors.CheckpointError, match=r'semantic/model/params (is corrupt|cannot be restored)'):
    exports.load(os.path.join(stage, 'model'))


@pytest.mark.parametrize('content, message', [('{}', "lacks \\['phase'\\]"), ('{"phase": "teacher"}', 'lacks'),
                                              ('\x00\xff garbage', 'cannot be read'), ('[1, 2]', 'lacks')])
def test_a_damaged_model_json_is_an_error_not_a_traceback(tmp_path, straight_teacher, content, message):
  export = str(tmp_path / 'model')
  shutil.copytree(os.path.join(straight_teacher, 'teacher', 'model'), export)
  with open(os.path.join(export, 'model.json'), 'w', encoding='latin-1') as f:
    f.write(content)
  with pytest.raises(errors.CheckpointError, match=message):
    exports.load(export)


def test_binary_garbage_in_metrics_jsonl_does_not_stop_a_resume(tmp_path, straight_teacher, monkeypatch):
  config = tiny.load_config()
  _kill_phase(monkeypatch, 'teacher', after=4)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, str(tmp_path), 'teacher')
  monkeypatch.undo()
  metrics = os.path.join(tmp_path, 'teacher', 'metrics.jsonl')
  with open(metrics, 'wb') as f:
    f.write(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes() + b'\n\xff\xfe{"step"\n')
  pipeline.run_phase(config, str(tmp_path), 'teacher')
  _same_params(straight_teacher, str(tmp_path))
  with open(metrics, encoding='utf-8') as f:  # what the resume logged (step 4; log_every=2), valid
    assert [json.loads(line)['step'] for line in f] == [4]


def test_a_kill_during_the_export_leaves_no_export_and_the_rerun_writes_it(tmp_path, straight_teacher,
                                                                            monkeypatch):
  config = tiny.load_config()
  real = files.write_json_atomic

  def killed(path, value, **kwargs):
    if path.endswith('model.json'):
      raise KeyboardInterrupt('killed before model.json')
    return real(path, value, **kwargs)

  monkeypatch.setattr(files, 'write_json_atomic', killed)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, str(tmp_path), 'teacher')
  monkeypatch.undo()
  assert os.path.isdir(tmp_path / 'teacher' / 'model') and not os.path.exists(tmp_path / 'teacher' / 'model' /
                                                                               'model.json')
  pipeline.run_phase(config, str(tmp_path), 'teacher')
  _same_params(straight_teacher, str(tmp_path))


# Provenance.


def test_a_resume_with_other_training_settings_lists_each_and_allow_changes_records_them(tmp_path, monkeypatch):
  """The teacher resumed with another learning rate, batch size or EMA is refused with each difference and the
  flag; with the flag, it continues and the change is recorded at the step it applies from."""
  config = tiny.load_config()
  _kill_phase(monkeypatch, 'teacher', after=4)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, str(tmp_path), 'teacher')
  monkeypatch.undo()
  changed = {'teacher.optimizer.learning_rate': 5e-4, 'teacher.batch_size': 16, 'teacher.ema_decay': 0.5}
  with pytest.raises(errors.IncompatibleRunError) as refused:
    pipeline.run_phase(tiny.load_config(**changed), str(tmp_path), 'teacher')
  for key in changed:
    assert f'{key}: saved' in str(refused.value)
  assert 'allow_changes' in str(refused.value)
  with pytest.raises(errors.IncompatibleRunError) as architecture:  # never allowed: the arrays would not fit
    pipeline.run_phase(tiny.load_config(**{'model.ch': 32, 'allow_changes': ('model',)}), str(tmp_path), 'teacher')
  assert 'model.ch: saved 16, now 32' in str(architecture.value) and 'allow_changes' not in str(architecture.value)
  lower = {'teacher.optimizer.learning_rate': 5e-4, 'allow_changes': ('teacher.optimizer',)}
  pipeline.run_phase(tiny.load_config(**lower), str(tmp_path), 'teacher')
  summary = exports.load(str(tmp_path)).config.summary
  assert [(c['step'], c['key'], c['saved'], c['now']) for c in summary.changes] == [
      (2, 'teacher.optimizer.learning_rate', 1e-3, 5e-4)]


def test_a_phase_that_builds_on_a_model_of_other_data_is_refused(tmp_path, tiny_run):
  workdir, _ = tiny_run
  images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / 'other.npz', images=images)
  other = tiny.load_config(**{'data.name': 'npz', 'data.path': str(tmp_path / 'other.npz'),
                              'distill.teacher': os.path.join(workdir, 'teacher', 'model')})
  with pytest.raises(errors.IncompatibleRunError, match=r"(?s)other data.*data\.name: there 'digits', now 'npz'.*"
                                                        r'allow_changes'):
    pipeline.run_phase(other, str(tmp_path / 'run'), 'distill')
  assert not os.path.exists(tmp_path / 'run' / 'distill' / 'stage_1' / 'checkpoints')  # refused before any work


# Kill and resume of the predictor's phases.


def _copy_run_without(workdir, dst, *folders):
  shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns('evaluate'))
  for folder in folders:
    shutil.rmtree(os.path.join(dst, folder))
  return dst


def test_semantic_and_latent_phases_killed_and_resumed_equal_uninterrupted(tmp_path, tiny_run, monkeypatch):
  workdir, _ = tiny_run
  config = tiny.load_config()
  stage = 'distill/stage_2'
  run = _copy_run_without(workdir, str(tmp_path / 'run'), f'{stage}/semantic', f'{stage}/latent')
  _kill_phase(monkeypatch, 'semantic', after=2)  # after its first step (checkpoint_every=1)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, run, 'semantic')
  monkeypatch.undo()
  pipeline.run_phase(config, run, 'semantic')
  _same_semantic = lambda a, b: jax.tree.map(np.testing.assert_array_equal, *(
      exports.load_semantic_params(os.path.join(p, stage, 'semantic', 'model'), config.model, config.sferd.semantic)
      for p in (a, b)))
  _same_semantic(workdir, run)

  real = codes_lib.CodeBatches
  monkeypatch.setattr(codes_lib, 'CodeBatches', lambda *a, **k: test_training._Interrupting(real(*a, **k), after=2))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, run, 'latent')
  monkeypatch.undo()
  pipeline.run_phase(config, run, 'latent')
  a, b = exports.load(os.path.join(workdir, stage)), exports.load(os.path.join(run, stage))
  jax.tree.map(np.testing.assert_array_equal, (a.semantic.latent_params, a.semantic.stats),
               (b.semantic.latent_params, b.semantic.stats))


# One run per folder, and errors a user can act on.


def _holder(folder):
  """A process holding folder's run lock until killed; returns it once the lock is taken."""
  code = (f'import sys, time; sys.path.insert(0, {tiny.ROOT!r}); from sferd_jax import files\n'
          f'with files.run_lock({folder!r}):\n  print("locked", flush=True); time.sleep(600)')
  holder = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  return holder


def test_one_run_per_folder_and_a_killed_holder_leaves_no_lock(tmp_path):
  holder = _holder(str(tmp_path))
  try:
    with pytest.raises(errors.RunLockedError, match=f'pid {holder.pid} on '):
      with files.run_lock(str(tmp_path)):
        pass
  finally:
    holder.kill()  # kill -9: the OS drops the lock
    holder.wait()
  with files.run_lock(str(tmp_path)):
    pass


def test_the_cli_refuses_a_second_run_and_a_changed_run_with_one_line_and_writes_nothing(tmp_path):
  workdir = str(tmp_path / 'run')
  args = ('--config=configs/tiny.py', f'--workdir={workdir}', '--mode=train_teacher')
  assert test_cli._main(*args).returncode == 0
  record = os.path.join(workdir, 'config_train_teacher.json')
  with open(record, 'rb') as f:
    before = f.read()
  refused = test_cli._main(*args, '--config.model.ch=32')  # the finished teacher has ch=16
  assert refused.returncode == errors.USER_ERROR_EXIT_CODE, refused.stderr[-2000:]
  assert len([line for line in refused.stderr.splitlines() if line.startswith('error: ')]) == 1, refused.stderr[-2000:]
  assert 'Traceback' not in refused.stderr
  with open(record, 'rb') as f:
    assert f.read() == before  # the refused run did not overwrite the record of the good one
  holder = _holder(workdir)
  try:
    start = time.time()
    second = test_cli._main(*args)
    assert second.returncode == errors.USER_ERROR_EXIT_CODE and f'pid {holder.pid}' in second.stderr
    assert time.time() - start < 60  # at once, not after a hang
  finally:
    holder.kill()
    holder.wait()
