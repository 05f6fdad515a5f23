"""The evaluate mode on the tiny run: seeded rounds on disk, exact resume, one row per variant, clear errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax import data as data_lib
from sferd_jax import errors
from sferd_jax.evaluation import evaluate
from sferd_jax.evaluation import inception
from sferd_jax.evaluation import metrics
from sferd_jax import exports
from sferd_jax import images as images_lib
from sferd_jax import layout
from sferd_jax import sampling
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
  with open(os.path.join(layout.RunLayout(workdir).evaluate_dir, name)) as f:
    return json.load(f) if name.endswith('.json') else f.read()


def _mtimes(folder):
  return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


class InjectedFailure(RuntimeError):
  pass


SENSITIVITY_CALLS = []
REAL_CODE_SENSITIVITY = sampling.code_sensitivity


def _fake_code_sensitivity(model, rng, *, num_samples):
  """Stands in for sampling.code_sensitivity (a trained predictor's, tested in test_semantic_pipeline): a function
  of its key, recording its calls, so that these tests check evaluate's plumbing without the predictor's cost."""
  SENSITIVITY_CALLS.append((model.path, jax.random.key_data(rng).tolist(), num_samples))
  value = float(jax.random.uniform(rng))
  return {'code_sensitivity': value, 'shift_rms': 2.0 * value}


@pytest.fixture(autouse=True)
def fake_code_sensitivity(monkeypatch):
  monkeypatch.setattr(sampling, 'code_sensitivity', _fake_code_sensitivity)


@pytest.fixture(scope='module')
def runs(tiny_run, tmp_path_factory):
  """An evaluation that fails at the 2nd round of its first variant and is run again; an uninterrupted one."""
  base = tmp_path_factory.mktemp('evaluate')
  interrupted = _copy_exports(tiny_run[0], base / 'interrupted')
  fresh = _copy_exports(tiny_run[0], base / 'fresh')
  config = small_config()
  real_sample = exports.Model.sample
  calls = []

  def failing_sample(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise InjectedFailure('pre-empted')
    return real_sample(self, *args, **kwargs)

  SENSITIVITY_CALLS.clear()
  with pytest.MonkeyPatch.context() as fake:
    fake.setattr(sampling, 'code_sensitivity', _fake_code_sensitivity)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(exports.Model, 'sample', failing_sample)
      with pytest.raises(InjectedFailure):
        evaluate.run_evaluate(config, interrupted)
    first_dir = os.path.join(layout.RunLayout(interrupted).evaluate_dir, 'teacher_4steps')
    after_failure = _mtimes(first_dir)
    classifier_mtimes = _mtimes(layout.RunLayout(interrupted).classifier_dir)
    resumed = evaluate.run_evaluate(config, interrupted)
    # The same classifier (trained once) in the uninterrupted run, so that the feature spaces are the same.
    shutil.copytree(layout.RunLayout(interrupted).classifier_dir,
                    layout.RunLayout(fresh).classifier_dir)
    uninterrupted = evaluate.run_evaluate(config, fresh)
  return dict(interrupted=interrupted, fresh=fresh, after_failure=after_failure, first_dir=first_dir,
              classifier_mtimes=classifier_mtimes, resumed=resumed, uninterrupted=uninterrupted,
              sensitivity_calls=list(SENSITIVITY_CALLS))


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
  assert _mtimes(layout.RunLayout(runs['interrupted']).classifier_dir) == runs['classifier_mtimes']
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
  # The memorisation check: one held-out baseline for all rows, a sample distance per row.
  assert len({r['nn_dist_real'] for r in rows}) == 1 and rows[0]['nn_dist_real'] > 0
  assert all(np.isfinite(r['nn_dist']) and r['nn_dist'] > 0 for r in rows)
  # The predictor's code sensitivity: semantic rows only.
  for row in rows:
    filled = [row[k] is not None for k in ('code_sensitivity', 'shift_rms')]
    assert filled == [row['semantic']] * 2, row['variant']
  table = _read(runs['fresh'], evaluate.RESULTS_MD)
  assert len([line for line in table.splitlines() if line.startswith('| ')]) == 1 + len(VARIANTS)
  assert 'NOT Inception' in table and rows[0]['extractor'] in table
  header = f"NN dist (real held-out: {rows[0]['nn_dist_real']:.4g})"
  assert [r[header] for r in _table(table)] == [f"{r['nn_dist']:.4g}" for r in rows]
  assert [r['code sens.'] for r in _table(table)] == ['-'] * 6 + [f"{rows[-1]['code_sensitivity']:.4g}"]
  assert 'suggest memorisation' in table and "mean |x'(c_i) - x'(c_j)|" in table
  # Guided and unguided samples of one model differ; so do the models.
  images = {}
  for row in rows:
    with np.load(os.path.join(layout.RunLayout(runs['fresh']).evaluate_dir, row['variant'], 'round_00000.npz')) as data:
      images[row['variant']] = data['images']
  assert len({v.tobytes() for v in images.values()}) == len(rows)


def test_fid_against_steps_is_plotted_a_line_per_variant(runs, monkeypatch):
  assert os.path.exists(os.path.join(layout.RunLayout(runs['fresh']).evaluate_dir, evaluate.PLOT_PNG))
  figures = []
  monkeypatch.setattr(images_lib, 'save_figure', lambda fig, path, dpi: figures.append(fig))
  rows = _read(runs['fresh'])
  evaluate.plot_fid_vs_steps(rows, 'unused.png')
  lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in figures[0].axes[0].lines}
  plain = sorted((r['num_steps'], r['fid']) for r in rows if not r['guidance'] and not r['semantic'])
  assert lines['plain, sample seed 0'] == ([s for s, _ in plain], [f for _, f in plain]) and len(plain) == 3
  assert set(lines) == {'plain, sample seed 0', 'guided, sample seed 0', 'predictor, sample seed 0'}


def test_a_finished_evaluation_draws_nothing_and_keeps_other_rows(runs):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(exports.Model, 'sample', lambda *a, **k: pytest.fail('a finished evaluation sampled again'))
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
    mp.setattr(exports.Model, 'sample', lambda *a, **k: pytest.fail('sampled again'))
    given = evaluate.run_evaluate(small_config(**{'evaluate.reference_stats': cache}), runs['fresh'])
  assert given['rows'] == runs['uninterrupted']['rows']
  # Statistics of another extractor are refused, as is a missing file.
  other = str(tmp_path / 'inception_stats.npz')
  metrics.save_reference_stats(other, mu=stats.mu, sigma=stats.sigma, num_images=24,
                               extractor='inception-2015-12-05/0123456789abcdef')
  with pytest.raises(errors.ConfigError, match='reference_stats.*made by feature extractor'):
    evaluate.run_evaluate(small_config(**{'evaluate.reference_stats': other}), runs['fresh'])
  with pytest.raises(errors.ConfigError, match='nowhere.npz.*not found'):
    evaluate.run_evaluate(small_config(**{'evaluate.reference_stats': str(tmp_path / 'nowhere.npz')}), runs['fresh'])


def test_missing_inception_weights_is_a_clear_error(runs, tmp_path):
  missing = str(tmp_path / 'inception.npz')
  for features in ('inception', 'auto'):
    with pytest.raises(errors.ConfigError, match=r'inception_weights.*inception\.npz.*not found.*export_inception'):
      evaluate.run_evaluate(small_config(**{'evaluate.features': features, 'evaluate.inception_weights': missing}),
                            runs['fresh'])
  with pytest.raises(errors.ConfigError, match='inception_weights.*export_inception'):
    evaluate.run_evaluate(small_config(**{'evaluate.features': 'inception'}), runs['fresh'])


def test_missing_models_are_clear_errors(runs, tmp_path):
  with pytest.raises(errors.CheckpointError, match='nothing to evaluate.*config.evaluate.models'):
    evaluate.run_evaluate(small_config(), str(tmp_path))
  with pytest.raises(errors.CheckpointError, match='no exported model found'):
    evaluate.run_evaluate(small_config(**{'evaluate.models': ('distill/stage_9',)}), runs['fresh'])


def test_rounds_of_other_settings_are_refused(runs):
  with pytest.raises(errors.IncompatibleRunError, match='teacher_4steps.*sampler'):
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


def test_a_second_sample_seed_draws_other_samples_in_rows_of_its_own(runs):
  """sample_seeds=(0, 1): seed 0 (config.seed) is the existing variant (its rounds reused, its name unchanged),
  seed 1 a new one with other samples, whose rows sit beside the first's."""
  config = small_config(**{'evaluate.models': ('distill/stage_2',), 'evaluate.guidance': (False,),
                           'evaluate.semantic': (False,), 'evaluate.sample_seeds': (0, 1)})
  first = os.path.join(layout.RunLayout(runs['fresh']).evaluate_dir, 'distill_stage_2_1steps')
  before = _mtimes(first)
  out = evaluate.run_evaluate(config, runs['fresh'])
  assert [(r['variant'], r['sample_seed']) for r in out['rows']] == [('distill_stage_2_1steps', 0),
                                                                     ('distill_stage_2_1steps_seed1', 1)]
  assert _mtimes(first) == before  # nothing drawn again for seed 0
  second = os.path.join(layout.RunLayout(runs['fresh']).evaluate_dir, 'distill_stage_2_1steps_seed1')
  with np.load(os.path.join(first, 'round_00000.npz')) as a, np.load(os.path.join(second, 'round_00000.npz')) as b:
    assert not np.array_equal(a['images'], b['images'])
  rows = _read(runs['fresh'])
  assert {r['sample_seed'] for r in rows if r['model'] == 'distill/stage_2' and not r['guidance']
          and not r['semantic']} == {0, 1}
  assert '| seed |' in _read(runs['fresh'], evaluate.RESULTS_MD)
  with pytest.raises(errors.ConfigError, match='sample_seeds'):
    config_lib.validate(small_config(**{'evaluate.sample_seeds': (1, 1)}))


def test_merge_rows_replaces_same_key_and_appends_new():
  row = lambda model, n, fid: dict(model=model, variant=f'{model}_1steps', num_steps=1, guidance=False,
                                   semantic=False, num_samples=n, extractor='e', fid=fid)
  old = [row('a', 10, 1.0), row('b', 10, 2.0)]
  merged = evaluate.merge_rows(old, [row('b', 10, 3.0), row('a', 20, 4.0)])
  assert [(r['model'], r['num_samples'], r['fid']) for r in merged] == [('a', 10, 1.0), ('b', 10, 3.0),
                                                                         ('a', 20, 4.0)]
  # A row written before sample_seeds existed (no 'sample_seed') is replaced by config.seed's row of its variant.
  before = [row('a', 10, 1.0)]
  assert evaluate.merge_rows(before, [dict(row('a', 10, 5.0), sample_seed=0)]) == [dict(row('a', 10, 5.0),
                                                                                         sample_seed=0)]


def _fake_inception(dim=16):
  """A feature fn named like the Inception's: a fixed projection of the pixels, with logits (for IS)."""
  rng = np.random.default_rng(0)
  project, head = rng.normal(size=(64, dim)), rng.normal(size=(dim, 5))

  def fn(images):
    pool = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0 @ project
    return {'pool': pool.astype(np.float32), 'logits': (pool @ head).astype(np.float32)}

  fn.extractor = f'{inception.EXTRACTOR_NAME}/fake'
  return fn


def test_published_stats_give_fid_and_is_and_no_kid(runs, tmp_path, caplog):
  """features=inception with a published mu/sigma file (no extractor, no image count, no features)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(runs['fresh'], workdir)
  fake = _fake_inception()
  reference = fake(np.random.default_rng(1).integers(0, 256, (100, 8, 8, 1), dtype=np.uint8))['pool']
  published = str(tmp_path / 'published.npz')
  np.savez(published, mu=reference.mean(0), sigma=np.cov(reference, rowvar=False))
  config = small_config(**{'evaluate.reference_stats': published, 'evaluate.models': ('teacher',)})
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(exports.Model, 'sample', lambda *a, **k: pytest.fail('sampled again'))
    mp.setattr(evaluate, 'feature_fn_for', lambda *a: fake)
    with caplog.at_level('WARNING'):
      rows = evaluate.run_evaluate(config, workdir)['rows']
  assert len(rows) == 2 and all(r['kid_mean'] is None and r['kid_std'] is None for r in rows)
  assert all(r['nn_dist'] is None and r['nn_dist_real'] is None for r in rows)
  assert all(np.isfinite(r['fid']) and r['fid'] > 0 and np.isfinite(r['is_mean']) for r in rows)
  assert 'names no feature extractor' in caplog.text and 'KID is not computed' in caplog.text
  table = _table(evaluate.results_table(rows))
  assert [r['KID'] for r in table] == ['-', '-'] and table[0]['FID'] == f"{rows[0]['fid']:.3f}"
  assert [r['NN dist (real held-out: -)'] for r in table] == ['-', '-']
  # Statistics of another dimension: a config error, not a scipy one; a published file for the classifier: refused.
  np.savez(published, mu=reference.mean(0)[:4], sigma=np.eye(4))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate, 'feature_fn_for', lambda *a: fake)
    with pytest.raises(errors.ConfigError, match='4-d but the features are 16-d.*reference_stats'):
      evaluate.run_evaluate(config, workdir)
  with pytest.raises(errors.ConfigError, match='reference_stats.*features=inception only'):
    evaluate.run_evaluate(config, workdir)


def _table(markdown):
  """results.md's table as one {header: cell} dict per row."""
  lines = [line for line in markdown.splitlines() if line.startswith('| ')]
  cells = lambda line: [c.strip() for c in line.strip('|').split('|')]
  return [dict(zip(cells(lines[0]), cells(line))) for line in lines[1:]]


def test_kid_header_and_values_are_the_raw_mmd():
  row = dict(model='m', stage=0, num_steps=1, guidance=False, semantic=False, num_samples=10, fid=1.0,
             kid_mean=0.0123, kid_std=0.0011, is_mean=None, is_std=None, extractor='classifier/x')
  table = evaluate.results_table([row])
  assert _table(table) == [{'model': 'm', 'stage': '-', 'steps': '1', 'guidance': 'off', 'semantic': 'off',
                            'seed': '-', 'samples': '10', 'FID': '1.000', 'KID': '0.0123 ± 0.0011', 'IS': '-',
                            'NN dist (real held-out: -)': '-', 'code sens.': '-', 'shift RMS': '-',
                            'features': 'classifier'}]
  assert 'not scaled by 1e3' in table


def test_samples_png_is_skipped_when_the_samples_are_gone(runs, tmp_path):
  """Round files deleted to save space, features kept: the scores stand, samples.png is not drawn from None."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(runs['fresh'], workdir)
  variant_dir = os.path.join(layout.RunLayout(workdir).evaluate_dir, 'teacher_4steps')
  for name in os.listdir(variant_dir):
    if name == 'samples.png' or (name.endswith('.npz') and not name.endswith('.features.npz')):
      os.remove(os.path.join(variant_dir, name))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(exports.Model, 'sample', lambda *a, **k: pytest.fail('sampled again'))
    rows = evaluate.run_evaluate(small_config(**{'evaluate.models': ('teacher',), 'evaluate.guidance': (False,)}),
                                 workdir)['rows']
  assert rows == runs['uninterrupted']['rows'][:1]
  assert not os.path.exists(os.path.join(variant_dir, 'samples.png'))


def test_unlabelled_data_asks_for_inception_weights(tiny_run, tmp_path):
  workdir = _copy_exports(tiny_run[0], tmp_path / 'run')
  data = str(tmp_path / 'unlabelled.npz')
  np.savez(data, images=np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8))
  config = small_config(**{'data.name': 'npz', 'data.path': data})
  with pytest.raises(errors.ConfigError, match='at least 2 classes.*1 classes.*inception_weights=OUT.npz'):
    evaluate.run_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(layout.RunLayout(workdir).evaluate_dir, 'classifier', 'classifier.npz'))


def test_weak_classifier_warning():
  assert 'weak quality signal' in evaluate.weak_classifier_warning(0.5)
  assert '0.500' in evaluate.weak_classifier_warning(0.5)
  assert evaluate.weak_classifier_warning(0.95) is None and evaluate.weak_classifier_warning(None) is None


def test_code_sensitivity_is_of_semantic_variants_with_a_key_of_no_round(runs):
  calls = runs['sensitivity_calls']
  # The interrupted run failed before any semantic variant; the resumed and the uninterrupted one: one call each.
  assert [path.endswith(os.path.join('distill', 'stage_2', 'model')) for path, _, _ in calls] == [True, True]
  assert calls[0][1:] == calls[1][1:] and calls[0][2] == evaluate.CODE_SENSITIVITY_SAMPLES
  rounds = [jax.random.key_data(evaluate.round_key(0, 'distill_stage_2_1steps_semantic', r)).tolist() for r in range(3)]
  assert calls[0][1] not in rounds
  row = runs['uninterrupted']['rows'][-1]
  assert row['semantic'] and row['shift_rms'] == 2.0 * row['code_sensitivity']


def test_samples_that_copy_training_images_are_at_nn_distance_zero(runs, tmp_path):
  """The memorisation check can fail: a variant whose 'samples' are the reference (training) images."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(runs['fresh'], workdir)
  config = small_config(**{'evaluate.models': ('teacher',), 'evaluate.guidance': (False,)})
  source = data_lib.load_source(data_lib.data_config(config))
  training = source.read(evaluate._subset(len(source), 24, config.seed))[0]  # reference_for's images
  variant_dir = os.path.join(layout.RunLayout(workdir).evaluate_dir, 'teacher_4steps')
  for r, start in enumerate((0, 10, 20)):
    evaluate.save_npz_atomic(evaluate.round_path(variant_dir, r), images=training[start:start + 10])
    os.remove(evaluate.round_path(variant_dir, r, '.features.npz'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(exports.Model, 'sample', lambda *a, **k: pytest.fail('sampled again'))
    row, = evaluate.run_evaluate(config, workdir)['rows']
  sampled = runs['uninterrupted']['rows'][0]
  assert row['nn_dist_real'] == sampled['nn_dist_real'] > 0  # the cached baseline
  assert row['nn_dist'] < 1e-3 * row['nn_dist_real'] and sampled['nn_dist'] > 100 * row['nn_dist']


def test_held_out_images_leave_themselves_out_and_are_cached(tmp_path):
  """digits has no test split: the classifier's held-out images, each compared with the reference but itself."""
  workdir = str(tmp_path)
  config = small_config(**{'evaluate.num_samples': 2000})  # more than digits' 1,797: all are reference images
  fake, calls = _fake_inception(), []

  def counting(images):
    calls.append(len(images))
    return fake(images)

  counting.extractor = fake.extractor
  reference = evaluate.reference_for(config, workdir, counting)
  source, indices, split = evaluate.held_out_images(config)
  everything = evaluate._subset(len(source), evaluate.CLASSIFIER_MAX_IMAGES, config.seed)
  assert split is None and reference.indices.tolist() == list(range(1797))
  assert sorted(indices) == sorted(everything[evaluate.classifier_split(len(everything), config.seed)[0]])
  assert len(indices) == 179
  calls.clear()
  nn_dist = evaluate.held_out_distance(config, workdir, counting, reference)
  assert sum(calls) == 179
  held = fake(source.read(indices)[0])['pool'].astype(np.float64)
  distances = np.sqrt(((held[:, None] - reference.features.astype(np.float64)[None]) ** 2).sum(-1))
  distances[np.arange(len(indices)), indices] = np.inf  # reference row i is image i
  assert nn_dist == pytest.approx(distances.min(axis=1).mean(), rel=1e-5) and nn_dist > 0
  # Cached: neither features nor distances again; another reference: the distance again, not the features.
  calls.clear()
  assert evaluate.held_out_distance(config, workdir, counting, reference) == nn_dist and not calls
  shifted = evaluate.Reference(reference.stats, reference.features + 1.0, reference.source,
                               indices=reference.indices, data=reference.data)
  assert evaluate.held_out_distance(config, workdir, counting, shifted) != nn_dist and not calls
  # Other data (digits ignores data.path, but the caches' descriptions hold it): both caches are recomputed.
  other = small_config(**{'evaluate.num_samples': 2000, 'data.path': '/elsewhere'})
  again = evaluate.held_out_distance(other, workdir, counting, evaluate.reference_for(other, workdir, counting))
  assert sum(calls) == 1797 + 179 and again == pytest.approx(nn_dist, rel=1e-6)
  # A reference of unknown images of data without a test split, or without features: no baseline.
  unknown = evaluate.Reference(reference.stats, reference.features, 'given.npz')
  assert evaluate.held_out_distance(config, workdir, counting, unknown) is None
  assert evaluate.held_out_distance(config, workdir, counting,
                                    evaluate.Reference(reference.stats, None, 'published.npz')) is None


def test_rows_from_before_the_new_columns_still_render(tmp_path):
  old = dict(model='m', variant='m_1steps', stage=0, num_steps=1, guidance=False, semantic=False, num_samples=10,
             fid=1.0, kid_mean=None, kid_std=None, is_mean=None, is_std=None, extractor='classifier/x')
  new = dict(old, model='s', variant='s_1steps_semantic', stage=2, semantic=True, nn_dist=0.5, nn_dist_real=2.0,
             code_sensitivity=0.25, shift_rms=0.125)
  plain = dict(new, semantic=False, nn_dist=1.5, code_sensitivity=None, shift_rms=None)
  # One shared baseline: in the header; None: '-'.
  table = _table(evaluate.results_table([new, plain]))
  assert list(table[0])[10:13] == ['NN dist (real held-out: 2)', 'code sens.', 'shift RMS']
  assert [(r['NN dist (real held-out: 2)'], r['code sens.'], r['shift RMS']) for r in table] == [
      ('0.5', '0.25', '0.125'), ('1.5', '-', '-')]
  # An old results.json row beside new ones: it still loads, and each row shows its own baseline.
  directory = str(tmp_path)
  evaluate.write_results(directory, [old])
  evaluate.write_results(directory, evaluate.merge_rows(evaluate.load_rows(directory), [new]))
  with open(os.path.join(directory, evaluate.RESULTS_MD)) as f:
    mixed = _table(f.read())
  assert [r['NN dist (real held-out: per row)'] for r in mixed] == ['- (real -)', '0.5 (real 2)']
  assert [(r['code sens.'], r['shift RMS']) for r in mixed] == [('-', '-'), ('0.25', '0.125')]


def test_the_real_code_sensitivity_fills_a_semantic_row(tiny_run, monkeypatch):
  monkeypatch.setattr(sampling, 'code_sensitivity', REAL_CODE_SENSITIVITY)
  config = small_config()
  model = exports.load(os.path.join(tiny_run[0], 'distill', 'stage_2'))
  variant = evaluate.model_variants(config, tiny_run[0], model.path, model)[-1]
  assert variant.semantic
  out = evaluate.code_sensitivity(config, variant, model)
  assert out == evaluate.code_sensitivity(config, variant, model)  # a function of (seed, variant)
  assert all(np.isfinite(v) and v >= 0 for v in out.values())
  assert evaluate.code_sensitivity(config, evaluate.model_variants(config, tiny_run[0], model.path, model)[0],
                                   model) == dict(code_sensitivity=None, shift_rms=None)
