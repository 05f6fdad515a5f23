"""The study's plumbing on the tiny config (sferd_jax/study.py): arms built as specified, resume, the table."""

import json
import os

import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax.evaluation import evaluate
from sferd_jax.evaluation import inception
from sferd_jax import exports
from sferd_jax import layout
from sferd_jax import pipeline
from sferd_jax import study
from sferd_jax.training import checkpointing
from sferd_jax.training import loop
import tiny


def tiny_study_config(results_dir, **study_overrides):
  config = tiny.load_config(**{
      'evaluate.num_samples': 16, 'evaluate.round_size': 16, 'evaluate.kid_subsets': 4,
      'evaluate.kid_subset_size': 8, 'evaluate.reference_split': 'all', 'analyze.num_images': 4,
      'analyze.num_noises': 2, 'analyze.times': (0.5,)})
  with config.unlocked():
    # Only the 1-step students, for time: which students a study scores is run_config's business, tested below.
    config.study = config_lib.study_config(**dict(dict(seeds=(0,), steps=(1,), bf16_seed=None,
                                                       results_dir=results_dir), **study_overrides))
  return config_lib.validate(config)


def _fake_inception(weights):
  """Stands in for the FID Inception (whose weights the tests do not have): a fixed projection of the pixels,
  named like the Inception's extractor."""
  del weights
  project = np.random.default_rng(0).normal(size=(64, 8))

  def fn(images):
    return {'pool': (np.asarray(images, np.float32).reshape(len(images), -1) / 255.0 @ project).astype(np.float32)}

  fn.extractor = f'{inception.EXTRACTOR_NAME}/fake'
  return fn


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  base = tmp_path_factory.mktemp('study')
  results_dir = str(base / 'results')
  weights = base / 'inception.npz'
  weights.write_bytes(b'')  # exists; the fake extractor never reads it
  config = tiny_study_config(results_dir, inception_weights=str(weights))
  workdir = str(base / 'run')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate, 'inception_feature_fn', _fake_inception)
    summary = study.run_study(config, workdir)
  return config, workdir, results_dir, summary


def _info(path):
  return exports.read_info(path)


def test_the_arms_are_built_as_specified(finished):
  config, workdir, _, _ = finished
  seed = os.path.join(workdir, 'seed_0')
  assert sorted(os.listdir(seed)) == ['guided', 'guided_inception', 'pd', 'pd_inception', 'pd_more', 'pd_target',
                                     study.ROWS_JSON]
  stage = lambda run, k: os.path.join(seed, run, 'distill', f'stage_{k}')
  # Every run distils the study's one teacher.
  assert {_info(os.path.join(stage(run, 1), 'model'))['teacher'] for run in ('pd', 'guided', 'pd_more')} == {
      study.teacher_path(workdir)}
  # Guidance only in the guided run's distillation target.
  meta = lambda run: checkpointing.PhaseCheckpoints(stage(run, 2), keep=1).restore_meta(
      config.distill.train_steps + (study.extra_distill_updates(config) if run == 'pd_more' else 0))['config']
  assert meta('guided')['attention_guidance']['enabled'] and meta('pd')['attention_guidance'] is None
  # pd_more: the predictors' updates spent on distillation.
  assert meta('pd_more')['training']['train_steps'] == config.distill.train_steps + study.extra_distill_updates(config)
  assert not os.path.exists(os.path.join(stage('pd_more', 2), 'semantic'))
  # pd_target: pd's students, bit for bit, with a predictor trained on PD's target.
  same = lambda k: exports.fingerprint(exports.load(stage('pd_target', k)).params) == \
      exports.fingerprint(exports.load(stage('pd', k)).params)
  assert same(1) and same(2)
  targets = {run: _info(os.path.join(stage(run, 2), 'semantic', 'model'))['semantic']['target']
             for run in ('pd', 'pd_target', 'guided')}
  assert targets == {'pd': 'teacher_on_data', 'pd_target': 'pd', 'guided': 'teacher_on_data'}
  # One feature classifier for every run.
  classifier = lambda run: os.path.join(layout.RunLayout(os.path.join(seed, run)).classifier_dir, 'classifier.npz')
  fingerprints = {open(classifier(run), 'rb').read()
                  for run in ('pd', 'pd_target', 'guided', 'pd_more')}
  assert len(fingerprints) == 1


def test_rows_cover_every_arm_and_step_count_and_the_table_says_so(finished):
  _, workdir, results_dir, summary = finished
  with open(os.path.join(workdir, 'seed_0', study.ROWS_JSON)) as f:
    rows = json.load(f)
  # The 1-step PD and SFERD students also with the (here: fake) FID Inception.
  scored = lambda r: evaluate.is_inception(r['extractor'])
  assert sorted((r['arm'], r['num_steps'], r['semantic']) for r in rows if scored(r)) == [('pd', 1, False),
                                                                                           ('sferd', 1, True)]
  rows = [r for r in rows if not scored(r)]
  # The 1-step students (steps=(1,)); the first seed also at a second sample seed.
  arms = {(r['arm'], r['num_steps']) for r in rows}
  assert arms == {(a, 1) for a in ('pd', 'pd+predictor', 'pd+pd_target_predictor', 'pd+guidance', 'sferd',
                                   'pd_more_updates')}
  assert {r['sample_seed'] for r in rows} == {0, 1000}
  assert all(r['seed'] == 0 for r in rows)
  # FID against the reference split; the memorisation check against training images, held-out ones its baseline.
  assert all(r['nn_dist'] is not None and r['nn_dist_real'] is not None for r in rows)
  assert any(name.endswith('_all.npz') for name in os.listdir(os.path.join(workdir, 'seed_0', 'pd', 'evaluate')))
  for name in ('results.json', 'results.md', 'fid_vs_steps.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert os.path.exists(os.path.join(results_dir, name))
  with open(os.path.join(workdir, 'results.md')) as f:
    table = f.read()
  assert 'sferd' in table and 'pd_more_updates' in table and 'Inception FID at 1 step' in table
  assert '## Fitting error' in table
  # The Inception's reference features were computed once and shared by the second evaluation.
  pd_eval, sferd_eval = (os.path.join(workdir, 'seed_0', f'{run}_inception', 'evaluate') for run in ('pd', 'guided'))
  shared = [n for n in os.listdir(pd_eval) if n.startswith('reference_') and n.endswith('.npz')]
  assert shared and all(open(os.path.join(pd_eval, n), 'rb').read() == open(os.path.join(sferd_eval, n), 'rb').read()
                        for n in shared)
  assert summary is not None


def test_a_finished_study_runs_nothing_again_here_or_on_another_machine(finished, tmp_path, monkeypatch):
  config, workdir, results_dir, summary = finished

  def refuse(*args, **kwargs):
    raise AssertionError('a finished unit ran again')

  monkeypatch.setattr(pipeline, 'run_pipeline', refuse)
  monkeypatch.setattr(loop, 'run_phase', refuse)  # the teacher is not trained again either
  again = study.run_study(config, workdir)
  assert json.dumps(again, sort_keys=True, default=str) == json.dumps(summary, sort_keys=True, default=str)
  # Another machine: an empty workdir, the committed units in results_dir.
  elsewhere = study.run_study(config, str(tmp_path / 'elsewhere'))
  assert json.dumps(elsewhere, sort_keys=True, default=str) == json.dumps(summary, sort_keys=True, default=str)
  assert layout.is_exported(os.path.join(tmp_path, 'elsewhere', 'teacher', 'model'))


def test_the_bfloat16_arm_and_its_config():
  config = tiny_study_config(None, bf16_seed=0)
  with pytest.raises(errors.ConfigError, match='inception_weights'):
    study.run_study(tiny_study_config(None, inception_weights='/nonexistent.npz'), '/tmp/unused')
  runs = {r.name: r for r in study.runs_of_seed(config, 0)}
  assert runs['guided_bf16'].dtype == 'bfloat16' and runs['guided_bf16'].guided
  assert 'guided_bf16' not in {r.name for r in study.runs_of_seed(config, 1)}
  cfg = study.run_config(config, '/w', runs['guided_bf16'], first_seed=False)
  assert cfg.model.dtype == 'bfloat16' and cfg.sferd.attention_guidance.enabled and cfg.evaluate.sample_seeds is None
  assert 'study' not in cfg
  # Every scored student gets a predictor and is evaluated; pd_more gets one predictor's updates per student.
  scored = tiny_study_config(None, steps=(4, 2, 1))
  cfg = study.run_config(scored, '/w', study.runs_of_seed(scored, 0)[0], first_seed=True)
  assert study.student_stages(scored) == {2: 1, 1: 2}  # tiny distils 4 -> 2 -> 1: no 4-step student
  assert cfg.sferd.semantic.stages == (1, 2) and cfg.evaluate.models == ('distill/stage_1', 'distill/stage_2')
  assert cfg.evaluate.sample_seeds == (0, 1000) and cfg.distill.teacher == os.path.abspath('/w/teacher/model')
  assert study.extra_distill_updates(scored) == scored.semantic.train_steps  # 2 predictors over 2 stages


def test_the_analysis_distils_the_first_seeds_students_again_where_they_are_missing(tmp_path, monkeypatch):
  """The first seed's rows came from another machine, its models did not: the analysis distils the two 1-step
  students again (distillation only) before analysing them in the teacher's risky regions."""
  from sferd_jax.evaluation import fitting_error  # pylint: disable=g-import-not-at-top
  config = tiny_study_config(None)
  distilled, analysed = [], []
  monkeypatch.setattr(pipeline, 'run_phase', lambda cfg, folder, name: distilled.append(
      (name, os.path.basename(folder), cfg.sferd.attention_guidance.enabled)))

  def fake_analysis(cfg, folder, *, mask_model_path):
    analysed.append((cfg.analyze.model, mask_model_path))
    path = os.path.join(layout.RunLayout(folder).analyze_dir, 'summary.json')
    study._write_json(path, {'levels': []})  # pylint: disable=protected-access

  monkeypatch.setattr(fitting_error, 'run_analysis', fake_analysis)
  summaries = study.analysis_unit(config, str(tmp_path), 0, None)
  assert distilled == [('distill', 'pd', False), ('distill', 'guided', True)]
  assert sorted(summaries) == ['pd_1step', 'sferd_1step', 'teacher']
  assert {mask for _, mask in analysed} == {study.teacher_path(str(tmp_path))}
