"""A run folder in a bucket (gs://), on the fake GCS of fake_gcs.py: the project's own files through files.py and
etils, Orbax's arrays through TensorStore's GCS driver, nothing on the network and nothing on the local disk."""

import json
import os

import jax
import numpy as np
import pytest

from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import files
from sferd_jax import layout
from sferd_jax import pipeline
from sferd_jax.evaluation import evaluate
import fake_gcs
import test_reliability
import tiny


@pytest.fixture
def bucket():
  with fake_gcs.bucket() as store:
    yield store


@pytest.fixture(params=['local', 'bucket'])
def folder(request, tmp_path):
  """The same file operations on a local folder and on a bucket folder."""
  if request.param == 'local':
    yield str(tmp_path / 'run')
  else:
    with fake_gcs.bucket():
      yield 'gs://fake-bucket/run'


def test_files_read_back_what_they_wrote(folder):
  path = os.path.join(folder, 'a', 'summary.json')
  assert not files.exists(path) and files.listdir(folder) == []
  files.write_json_atomic(path, {'loss': 0.5})
  files.write_json_atomic(path, {'loss': 0.25})  # replaced whole
  assert files.read_json(path) == {'loss': 0.25} and files.isfile(path) and files.isdir(os.path.join(folder, 'a'))
  log = os.path.join(folder, 'a', 'metrics.jsonl')
  files.append_text(log, '{"step": 1}\n')
  files.append_text(log, '{"step": 2}\n')
  assert files.read_text(log).splitlines() == ['{"step": 1}', '{"step": 2}']
  with files.atomic_path(os.path.join(folder, 'a', 'round_00000.npz')) as tmp:
    np.savez(tmp, images=np.arange(6, dtype=np.uint8))
  with files.load_npz(os.path.join(folder, 'a', 'round_00000.npz')) as data:
    np.testing.assert_array_equal(data['images'], np.arange(6))
  assert files.glob(os.path.join(folder, 'a'), 'round_*.npz') == [os.path.join(folder, 'a', 'round_00000.npz')]
  assert files.listdir(os.path.join(folder, 'a')) == ['metrics.jsonl', 'round_00000.npz', 'summary.json']
  assert files.size_and_mtime(log)[0] == len('{"step": 1}\n{"step": 2}\n')
  files.move(os.path.join(folder, 'a'), os.path.join(folder, 'aside', 'a'))
  assert not files.exists(os.path.join(folder, 'a')) and files.read_json(os.path.join(folder, 'aside', 'a',
                                                                                      'summary.json'))
  files.remove(os.path.join(folder, 'aside'))
  assert files.listdir(folder) == []


def test_a_failed_writer_leaves_the_previous_file(folder):
  path = os.path.join(folder, 'model.json')
  files.write_text_atomic(path, 'old')
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_path(path) as tmp:
      with open(tmp, 'w') as f:
        f.write('half')
      raise KeyboardInterrupt('killed mid-write')
  assert files.read_text(path) == 'old' and files.listdir(folder) == ['model.json']


def test_a_bucket_has_no_lock_and_says_so(bucket, caplog):
  with files.run_lock('gs://fake-bucket/run'):
    pass
  assert 'no locks' in caplog.text and not bucket.keys('fake-bucket/run/')  # and no .lock object


def test_unknown_schemes_are_one_line_errors():
  with pytest.raises(errors.ConfigError, match='not supported'):
    files.check_reachable('ftp://host/run')


def test_a_run_in_a_bucket_finishes_resumes_and_equals_a_local_run(bucket, tiny_run, tmp_path, monkeypatch):
  """Teacher and distillation 4 -> 2 -> 1 in gs://, the teacher killed mid-way and resumed: the exports are the local
  tiny run's, bit for bit; every file is in the bucket (none on the local disk); a rerun skips every phase; a model
  loads and samples from there; the evaluation writes there and resumes from there."""
  local_run, _ = tiny_run
  workdir = 'gs://fake-bucket/run'
  config = tiny.load_config(phases=('teacher', 'distill'))
  files.check_reachable(workdir)
  monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here
  test_reliability._kill_phase(monkeypatch, 'teacher', after=4)  # after its checkpoint at step 2
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_pipeline(config, workdir)
  monkeypatch.undo()
  monkeypatch.chdir(tmp_path)
  run = layout.RunLayout(workdir)
  assert not layout.is_exported(run.teacher_model)
  assert bucket.keys('fake-bucket/run/teacher/checkpoints/2/')  # where the resume starts

  pipeline.run_pipeline(config, workdir)
  assert os.listdir(tmp_path) == []
  for name in (run.teacher_model, run.stage_model(1), run.stage_model(2)):
    test_reliability._same_params(name.replace(workdir, local_run), name)
  steps = [json.loads(line)['step'] for line in files.read_text(os.path.join(run.teacher_dir, 'metrics.jsonl'))
           .splitlines()]
  assert steps == [2, 4]  # step 2's line from the killed run, step 4's from the resumed one
  stored = set(bucket.keys('fake-bucket/run/'))
  for relative in ('teacher/summary.json', 'teacher/samples/step_00000004.png', 'distill/stages.json',
                   'distill/stages.md', 'samples/comparison.png', 'distill/stage_2/model/model.json'):
    assert f'fake-bucket/run/{relative}' in stored, relative

  before = len(stored)
  pipeline.run_pipeline(config, workdir)  # finished: skipped, nothing rewritten but the tables
  assert len(bucket.keys('fake-bucket/run/')) == before
  model = exports.load(workdir)
  assert model.path == run.stage_model(2)
  samples = model.sample(jax.random.key(0), num_samples=2)
  assert samples.shape == (2, 8, 8, 1) and np.isfinite(samples).all()

  # The evaluation's classifier, rounds and tables go there too, and a rerun finds them all.
  small = tiny.load_config(**{'evaluate.num_samples': 12, 'evaluate.round_size': 6, 'evaluate.kid_subsets': 4,
                              'evaluate.kid_subset_size': 6, 'evaluate.classifier_steps': 20})
  rows = evaluate.run_evaluate(small, workdir)['rows']
  assert [row['model'] for row in rows] == ['teacher', 'distill/stage_1', 'distill/stage_2']
  assert files.read_json(os.path.join(run.evaluate_dir, evaluate.RESULTS_JSON)) == json.loads(json.dumps(rows))
  assert [key.rsplit('/', 1)[1] for key in bucket.keys('fake-bucket/run/evaluate/teacher_4steps/round_')] == [
      'round_00000.features.npz', 'round_00000.npz', 'round_00001.features.npz', 'round_00001.npz']
  written = set(bucket.keys('fake-bucket/run/evaluate/'))
  assert evaluate.run_evaluate(small, workdir)['rows'] == rows
  assert set(bucket.keys('fake-bucket/run/evaluate/')) == written
  assert os.listdir(tmp_path) == []
