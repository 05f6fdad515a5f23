"""The evaluate mode on the tiny run: seeded rounds on disk, exact resume, one row per variant, clear errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax import sampling
from sferd_jax.evaluation import evaluate
from sferd_jax.evaluation import metrics
from sferd_jax.training import checkpointing
from sferd_jax.training import loop
import tiny

SMALL = {'evaluate.num_samples': 24, 'evaluate.round_size': 10, 'evaluate.kid_subsets': 20,
         'evaluate.kid_subset_size': 8, 'evaluate.guidance': (False, True), 'evaluate.semantic': (False, True)}
# The tiny run: teacher (4 steps), stage 1 (2), stage 2 (1) with a semantic predictor; semantic + guidance is no
# sampler, so stage 2 has three variants.
VARIANTS = [('teacher', 0, 4, False, False), ('teacher', 0, 4, True, False),
            ('distill/stage_1', 1, 2, False, False), ('distill/stage_1', 1, 2, True, False),
            ('distill/stage_2', 2, 1, False, False), ('distill/stage_2', 2, 1, True, False),
            ('distill/stage_2', 2, 1, False, True)]


def small_config(**overrides):
  return tiny.load_config(**{**SMALL, **overrides})


def _copy_exports(src, dst):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('checkpoints', 'evaluate', 'analyze'))
  return str(dst)


def _read(workdir, name=evaluate.RESULTS_JSON):
  with open(os.path.join(workdir, evaluate.EVAL_DIR, name)) as f:
    return json.load(f) if name.endswith('.json') else f.read()


def _mtimes(folder):
  return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


class InjectedFailure(RuntimeError):
  pass


@pytest.fixture(scope='module')
def runs(tiny_run, tmp_path_factory):
  """An evaluation that fails at the 2nd round of its first variant and is run again; an uninterrupted one."""
  base = tmp_path_factory.mktemp('evaluate')
  interrupted = _copy_exports(tiny_run[0], base / 'interrupted')
  fresh = _copy_exports(tiny_run[0], base / 'fresh')
  config = small_config()
  real_sample = sampling.Model.sample
  calls = []

  def failing_sample(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise InjectedFailure('pre-empted')
    return real_sample(self, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sampling.Model, 'sample', failing_sample)
    with pytest.raises(InjectedFailure):
      evaluate.run_evaluate(config, interrupted)
  first_dir = os.path.join(interrupted, evaluate.EVAL_DIR, 'teacher_4steps')
  after_failure = _mtimes(first_dir)
  classifier_mtimes = _mtimes(os.path.join(interrupted, evaluate.EVAL_DIR, 'classifier'))
  resumed = evaluate.run_evaluate(config, interrupted)
  # The same classifier (trained once) in the uninterrupted run, so that the feature spaces are the same.
  shutil.copytree(os.path.join(interrupted, evaluate.EVAL_DIR, 'classifier'),
                  os.path.join(fresh, evaluate.EVAL_DIR, 'classifier'))
  uninterrupted = evaluate.run_evaluate(config, fresh)
  return dict(interrupted=interrupted, fresh=fresh, after_failure=after_failure, first_dir=first_dir,
              classifier_mtimes=classifier_mtimes, resumed=resumed, uninterrupted=uninterrupted)


def test_interrupted_evaluation_resumes_to_the_same_numbers(runs):
  assert set(runs['after_failure']) == {'meta.json', 'round_00000.npz', 'round_00000.features.npz'}
  assert _read(runs['interrupted']) == _read(runs['fresh'])  # identical numbers, not merely close
  assert runs['resumed']['rows'] == runs['uninterrupted']['rows']
  # The rounds saved before the failure were reused, not drawn again; the classifier was not retrained.
  after_resume = _mtimes(runs['first_dir'])
  assert {k: after_resume[k] for k in runs['after_failure']} == runs['after_failure']
  assert sorted(after_resume) == ['meta.json', 'round_00000.features.npz', 'round_00000.npz',
                                  'round_00001.features.npz', 'round_00001.npz', 'round_00002.features.npz',
                                  'round_00002.npz', 'samples.png']
  assert _mtimes(os.path.join(runs['interrupted'], evaluate.EVAL_DIR, 'classifier')) == runs['classifier_mtimes']
  with np.load(os.path.join(runs['first_dir'], 'round_00002.npz')) as data:
    assert data['images'].shape == (4, 8, 8, 1) and data['images'].dtype == np.uint8  # 24 = 10 + 10 + 4


def test_one_row_per_variant_in_json_and_markdown(runs):
  rows = _read(runs['fresh'])
  assert [(r['model'], r['stage'], r['num_steps'], r['guidance'], r['semantic']) for r in rows] == VARIANTS
  for row in rows:
    assert set(row) >= set(evaluate.ROW_KEYS)
    assert row['num_samples'] == 24 and row['extractor'].startswith('classifier/')
    assert all(np.isfinite(row[k]) for k in ('fid', 'kid_mean', 'kid_std', 'is_mean', 'is_std'))
    assert row['fid'] > 0 and 1.0 <= row['is_mean'] <= 10.0
  assert len({r['variant'] for r in rows}) == len(rows)
  table = _read(runs['fresh'], evaluate.RESULTS_MD)
  assert len([line for line in table.splitlines() if line.startswith('| ')]) == 1 + len(VARIANTS)
  assert 'NOT Inception' in table and rows[0]['extractor'] in table
  # Guided and unguided samples of one model differ; so do the models.
  images = {}
  for row in rows:
    with np.load(os.path.join(runs['fresh'], evaluate.EVAL_DIR, row['variant'], 'round_00000.npz')) as data:
      images[row['variant']] = data['images']
  assert len({v.tobytes() for v in images.values()}) == len(rows)


def test_a_finished_evaluation_draws_nothing_and_keeps_other_rows(runs):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sampling.Model, 'sample', lambda *a, **k: pytest.fail('a finished evaluation sampled again'))
    again = evaluate.run_evaluate(small_config(**{'evaluate.models': ('distill/stage_1',),
                                                  'evaluate.guidance': (True,)}), runs['interrupted'])
  assert again['rows'] == [runs['resumed']['rows'][3]]
  # results.json keeps the rows this call did not score, in their places.
  assert _read(runs['interrupted']) == _read(runs['fresh'])


def test_reference_stats_cache_given_file_and_refusals(runs, tmp_path):
  rows = _read(runs['fresh'])
  cache = evaluate.reference_path(runs['fresh'], rows[0]['extractor'])
  stats = metrics.load_reference_stats(cache, extractor=rows[0]['extractor'])
  assert stats.num_images == 24 and stats.mu.shape == (128,)
  with np.load(cache) as data:
    assert data['features'].shape == (24, 128)
  # The cache given as config.evaluate.reference_stats: the same numbers (it carries the features for KID too).
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sampling.Model, 'sample', lambda *a, **k: pytest.fail('sampled again'))
    given = evaluate.run_evaluate(small_config(**{'evaluate.reference_stats': cache}), runs['fresh'])
  assert given['rows'] == runs['uninterrupted']['rows']
  # Statistics of another extractor are refused, as is a missing file.
  other = str(tmp_path / 'inception_stats.npz')
  metrics.save_reference_stats(other, mu=stats.mu, sigma=stats.sigma, num_images=24,
                               extractor='inception-2015-12-05/0123456789abcdef')
  with pytest.raises(config_lib.ConfigError, match='reference_stats.*made by feature extractor'):
    evaluate.run_evaluate(small_config(**{'evaluate.reference_stats': other}), runs['fresh'])
  with pytest.raises(config_lib.ConfigError, match='nowhere.npz.*not found'):
    evaluate.run_evaluate(small_config(**{'evaluate.reference_stats': str(tmp_path / 'nowhere.npz')}), runs['fresh'])


def test_missing_inception_weights_is_a_clear_error(runs, tmp_path):
  missing = str(tmp_path / 'inception.npz')
  for features in ('inception', 'auto'):
    with pytest.raises(config_lib.ConfigError, match=r'inception_weights.*inception\.npz.*not found.*export_inception'):
      evaluate.run_evaluate(small_config(**{'evaluate.features': features, 'evaluate.inception_weights': missing}),
                            runs['fresh'])
  with pytest.raises(config_lib.ConfigError, match='inception_weights.*export_inception'):
    evaluate.run_evaluate(small_config(**{'evaluate.features': 'inception'}), runs['fresh'])


def test_missing_models_are_clear_errors(runs, tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='nothing to evaluate.*config.evaluate.models'):
    evaluate.run_evaluate(small_config(), str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError, match='no exported model found'):
    evaluate.run_evaluate(small_config(**{'evaluate.models': ('distill/stage_9',)}), runs['fresh'])


def test_rounds_of_other_settings_are_refused(runs):
  with pytest.raises(loop.IncompatibleRunError, match='teacher_4steps.*sampler'):
    evaluate.run_evaluate(small_config(**{'sample.sampler': 'ancestral'}), runs['fresh'])


def test_round_keys_sizes_and_names():
  assert evaluate.round_sizes(24, 10) == [10, 10, 4] and evaluate.round_sizes(20, 10) == [10, 10]
  assert evaluate.round_sizes(5, 10) == [5]
  key = lambda *a: jax.random.key_data(evaluate.round_key(*a)).tolist()
  assert key(0, 'teacher_4steps', 1) == key(0, 'teacher_4steps', 1)
  assert len({str(key(*a)) for a in ((0, 'a', 0), (0, 'a', 1), (0, 'b', 0), (1, 'a', 0))}) == 4
  assert evaluate.safe_name('classifier/ab:12') == 'classifier_ab_12'
  variant = evaluate.Variant(model='distill/stage_2', path='/x', stage=2, num_steps=1, guidance=True, semantic=False)
  assert variant.name == 'distill_stage_2_1steps_guided'
  assert evaluate.model_label('/w/distill/stage_2/model', '/w') == 'distill/stage_2'
  assert evaluate.model_label('/elsewhere/teacher/model', '/w') == '/elsewhere/teacher'


def test_merge_rows_replaces_same_key_and_appends_new():
  row = lambda model, n, fid: dict(model=model, num_steps=1, guidance=False, semantic=False, num_samples=n,
                                   extractor='e', fid=fid)
  old = [row('a', 10, 1.0), row('b', 10, 2.0)]
  merged = evaluate.merge_rows(old, [row('b', 10, 3.0), row('a', 20, 4.0)])
  assert [(r['model'], r['num_samples'], r['fid']) for r in merged] == [('a', 10, 1.0), ('b', 10, 3.0),
                                                                         ('a', 20, 4.0)]
