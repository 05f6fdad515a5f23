"""The ablation study: does SFERD beat progressive distillation? (`--mode=study`, config.study)

  python -m sferd_jax.main --config=configs/study_fashion_mnist.py --mode=study --workdir=runs/study

One teacher, trained once; then, per distillation seed, a few ordinary pipeline runs (the pipeline's phases, no
second training path) whose models are the arms:

  run          distillation               predictors (last three stages)   arms (steps 4, 2, 1)
  pd           plain teacher target       target teacher_on_data           pd, pd+predictor
  pd_target    pd's students, copied      target pd (capacity only)        pd+pd_target_predictor
  guided       attention-guided target    target teacher_on_data (guided)  pd+guidance, sferd
  pd_more      plain, more updates        none                             pd_more_updates
  guided_bf16  as guided, bfloat16        as guided                        pd+guidance_bf16, sferd_bf16 (one seed)

pd_more spends the predictors' updates (3 x semantic.train_steps) on distillation instead, spread over the stages:
the same number of updates, a control for "more training" (a semantic step costs ~0.75 of a guided distill step).
Every run evaluates with the study's one feature classifier (trained once, copied into each run) against the
reference statistics of config.evaluate.reference_split (the held-out test split), so their numbers compare.
The first seed's runs also evaluate a second sample seed (the sampling noise) and run the fitting-error analysis
(teacher, 1-step pd and sferd students; the students' risky-mask errors in the teacher's regions).

Units and resume. A unit is the teacher's export, the classifier, one seed's rows (all its runs evaluated) or the
analysis. Finished units are mirrored into config.study.results_dir (small: ~2 MB of teacher, KBs of rows; meant
to be committed), and a study started on another machine restores them from there and skips them: only
unfinished seeds run again. Inside a unit, every phase resumes from its checkpoints as in any pipeline run.

Layout of <workdir>:
  teacher/                   the shared teacher run (teacher/model is its export)
  evaluate/classifier/       the shared feature classifier
  seed_<s>/<run>/            a pipeline run folder; seed_<s>/rows.json: the seed's rows, written when all its runs
                             are evaluated
  analyze/<model>/           the fitting-error analyses
  results.json, results.md, fid_vs_steps.png   (evaluation/study_report.py)
"""

import copy
import dataclasses
import json
import math
import os
from typing import Optional

from absl import logging

from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax.evaluation import evaluate
from sferd_jax.evaluation import fitting_error
from sferd_jax.evaluation import study_report
from sferd_jax import files
from sferd_jax import layout
from sferd_jax import pipeline

ROWS_JSON = 'rows.json'


@dataclasses.dataclass(frozen=True)
class Run:
  """One pipeline run of the study."""
  name: str
  seed: int
  arms: tuple  # ((arm, semantic: bool), ...): which evaluated variants are which arm
  guided: bool = False
  target: str = 'teacher_on_data'
  extra_updates: bool = False  # pd_more: the predictors' updates spent on distillation
  dtype: Optional[str] = None  # None = config.model.dtype
  copy_students_from: Optional[str] = None  # a run of the same seed whose distill exports this run reuses
  predictors: bool = True

  @property
  def phases(self):
    distill = () if self.copy_students_from else ('distill',)
    return distill + (('semantic', 'latent') if self.predictors else ()) + ('evaluate',)


def runs_of_seed(config, seed):
  """The runs of one distillation seed, in the order they must run (pd_target reuses pd's students)."""
  runs = [Run('pd', seed, (('pd', False), ('pd+predictor', True))),
          Run('pd_target', seed, (('pd+pd_target_predictor', True),), target='pd', copy_students_from='pd'),
          Run('guided', seed, (('pd+guidance', False), ('sferd', True)), guided=True),
          Run('pd_more', seed, (('pd_more_updates', False),), extra_updates=True, predictors=False)]
  if config.study.bf16_seed == seed:
    runs.append(Run('guided_bf16', seed, (('pd+guidance_bf16', False), ('sferd_bf16', True)), guided=True,
                    dtype='bfloat16'))
  return runs


def extra_distill_updates(config):
  """Updates per stage that pd_more adds: the predictors' updates (one predictor per scored student), spread over
  every stage."""
  num_predictors = len(student_stages(config))
  return math.ceil(num_predictors * config.semantic.train_steps / config_lib.num_stages(config))


def student_stages(config):
  """{steps: stage} of the students the study scores: those of 4, 2 and 1 steps (as many as the run has)."""
  stages = {config.distill.start_num_steps // 2**k: k for k in range(1, config_lib.num_stages(config) + 1)}
  return {steps: stages[steps] for steps in config.study.steps if steps in stages}


def teacher_path(workdir):
  return files.absolute(layout.RunLayout(workdir).teacher_model)


def run_dir(workdir, run):
  return os.path.join(workdir, f'seed_{run.seed}', run.name)


def without_study(config):
  """A copy of a study config without its `study` section: the pipeline config the study's phases start from."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    del cfg['study']
  return cfg


def run_config(config, workdir, run, *, first_seed):
  """The pipeline config of one run: the study's config with the run's settings (validated, locked)."""
  cfg = without_study(config)
  with cfg.unlocked():
    cfg.seed = run.seed
    cfg.phases = run.phases
    cfg.distill.teacher = teacher_path(workdir)
    cfg.sferd.attention_guidance.enabled = run.guided
    cfg.sferd.semantic.target = run.target
    if run.extra_updates:
      cfg.distill.train_steps += extra_distill_updates(config)
    if run.dtype:
      cfg.model.dtype = run.dtype
    stages = student_stages(config)
    cfg.sferd.semantic.stages = tuple(sorted(stages.values()))  # a predictor on every scored student
    cfg.evaluate.models = tuple(f'distill/stage_{stage}' for stage in stages.values())
    cfg.evaluate.semantic = tuple(sorted({semantic for _, semantic in run.arms}))
    cfg.evaluate.guidance = (False,)
    # The first seed's models are also drawn at a second sample seed: how much FID moves with the samples alone.
    cfg.evaluate.sample_seeds = (run.seed, run.seed + config.study.second_sample_seed_offset) if first_seed else None
  return config_lib.validate(cfg)


def _copy_tree(src, dst):
  """src -> dst through a temporary name, so an interrupted copy is never taken for a finished one."""
  if files.exists(dst):
    return
  with files.atomic_path(dst) as tmp:
    files.copy(src, tmp)


def _write_json(path, value):
  files.write_text_atomic(path, json.dumps(value, indent=2))


def arm_rows(config, run, results_rows):
  """A run's evaluate rows as the study's rows: its arm, distillation seed and step count."""
  arm_of = dict((semantic, arm) for arm, semantic in run.arms)
  wanted = {f'distill/stage_{stage}' for stage in student_stages(config).values()}
  out = []
  for row in results_rows:
    if row['model'] not in wanted or row['guidance'] or row['semantic'] not in arm_of:
      continue
    out.append(dict(row, arm=arm_of[row['semantic']], seed=run.seed, run=run.name))
  return out


def _restore(results_dir, workdir, relative):
  """A finished unit mirrored in results_dir, copied back into the workdir (another machine's work)."""
  if not results_dir:
    return
  src, dst = os.path.join(results_dir, relative), os.path.join(workdir, relative)
  if files.exists(src) and not files.exists(dst):
    logging.info('study: restoring %s from %s', relative, results_dir)
    if files.isdir(src):
      _copy_tree(src, dst)
    else:
      files.copy(src, dst)


def _mirror(results_dir, workdir, relative):
  """A finished unit copied into results_dir (to be committed), unless it is there."""
  if not results_dir:
    return
  src, dst = os.path.join(workdir, relative), os.path.join(results_dir, relative)
  if files.isdir(src):
    _copy_tree(src, dst)
  elif not files.exists(dst):
    files.copy(src, dst)


def run_seed(config, workdir, seed, *, first_seed, classifier_dir):
  """Every run of one distillation seed, then its rows; returns the rows."""
  rows = []
  for run in runs_of_seed(config, seed):
    folder = run_dir(workdir, run)
    if run.copy_students_from:  # the same students: their exports (and their teacher fingerprints) reused
      source = run_dir(workdir, dataclasses.replace(run, name=run.copy_students_from))
      for stage in range(1, config_lib.num_stages(config) + 1):
        export = os.path.join('distill', f'stage_{stage}', 'model')
        _copy_tree(os.path.join(source, export), os.path.join(folder, export))
    if classifier_dir:
      _copy_tree(classifier_dir, layout.RunLayout(folder).classifier_dir)
    cfg = run_config(config, workdir, run, first_seed=first_seed)
    logging.info('study: seed %d, run %s (phases %s)', seed, run.name, cfg.phases)
    pipeline.run_pipeline(cfg, folder)
    rows += arm_rows(config, run, evaluate.load_rows(layout.RunLayout(folder).evaluate_dir))
  if config.study.inception_weights:
    rows += inception_rows(config, workdir, seed)
  return rows


def _share_reference_features(src, dst):
  """Copies src's cached reference features (evaluate/reference_*.npz) into dst's evaluate folder; evaluate checks
  that a cache was made from its own data and image count before using it."""
  src, dst = layout.RunLayout(src).evaluate_dir, layout.RunLayout(dst).evaluate_dir
  if not files.isdir(src):
    return
  files.makedirs(dst)
  for name in files.listdir(src):
    if name.startswith('reference_') and name.endswith('.npz') and not files.exists(os.path.join(dst, name)):
      files.copy(os.path.join(src, name), os.path.join(dst, name))


INCEPTION_ARMS = (('pd', 'pd', False), ('sferd', 'guided', True))  # (arm, run, semantic): the 1-step models scored


def inception_rows(config, workdir, seed):
  """The 1-step PD and SFERD students of a seed, scored with the FID Inception as well (published-FID features),
  each in a folder of its own beside its run (evaluate/ of a run holds one extractor's reference and rounds)."""
  stage = student_stages(config).get(1)
  if stage is None:
    return []
  rows, first = [], None
  for arm, name, semantic in INCEPTION_ARMS:
    run = next(r for r in runs_of_seed(config, seed) if r.name == name)
    folder = f'{run_dir(workdir, run)}_inception'
    relative = os.path.join('distill', f'stage_{stage}')
    for part in ('model',) + (('semantic/model', 'latent/model') if semantic else ()):
      _copy_tree(os.path.join(run_dir(workdir, run), relative, part), os.path.join(folder, relative, part))
    if first is not None:  # the same reference images: their Inception features (minutes on a CPU) computed once
      _share_reference_features(first, folder)
    first = first or folder
    cfg = run_config(config, workdir, run, first_seed=False)
    with cfg.unlocked():
      cfg.phases = ('evaluate',)
      cfg.evaluate.update(features='inception', inception_weights=files.absolute(config.study.inception_weights),
                          models=(relative,), semantic=(semantic,))
    logging.info('study: seed %d, %s at 1 step with the FID Inception', seed, arm)
    evaluate.run_evaluate(config_lib.validate(cfg), folder)
    rows += arm_rows(config, dataclasses.replace(run, arms=((arm, semantic),)),
                     evaluate.load_rows(layout.RunLayout(folder).evaluate_dir))
  return rows


def run_analyses(config, workdir, seed):
  """The fitting-error analysis of the teacher and the 1-step pd and sferd students of `seed`; the students'
  risky-mask errors are measured in the teacher's risky regions.

  The seed's rows may have come from another machine without its models: then the two students are distilled
  again here (deterministic: the same models), distillation only.
  """
  stage = student_stages(config).get(1)
  models = {'teacher': teacher_path(workdir)}
  if stage is not None:
    for arm, name in (('pd', 'pd'), ('sferd', 'guided')):
      run = next(r for r in runs_of_seed(config, seed) if r.name == name)
      path = layout.RunLayout(run_dir(workdir, run)).stage_dir(stage)
      if not layout.is_exported(layout.export_of(path)):
        logging.info('study: %s is not on this machine; distilling it again for the analysis', path)
        pipeline.run_phase(run_config(config, workdir, run, first_seed=False), run_dir(workdir, run), 'distill')
      models[f'{arm}_1step'] = path
  summaries = {}
  for name, path in models.items():
    folder = os.path.join(workdir, 'analyze', name)
    summary_path = os.path.join(layout.RunLayout(folder).analyze_dir, 'summary.json')
    if not files.exists(summary_path):
      cfg = without_study(config)
      with cfg.unlocked():
        cfg.analyze.model = files.absolute(path)
      fitting_error.run_analysis(cfg, folder, mask_model_path=teacher_path(workdir))
    summaries[name] = files.read_json(summary_path)
  return summaries


def analysis_lines(analyses):
  """Markdown lines of the fitting-error analyses: per model and noise level, the best block's attention-variance
  correlation against its permutation null, the partial correlation given the foreground and the error inside the
  teacher's risky mask relative to outside."""
  lines = ['', '## Fitting error (SFERD.md §5)', '',
           '| model | t | best block | corr. | null 95% | p | partial corr. (foreground) | risky error ratio |',
           '|---|---|---|---|---|---|---|---|']
  fmt = lambda v, spec='.3f': '-' if v is None else format(v, spec)
  for name, summary in analyses.items():
    for level in summary['levels']:
      block = level.get('best_block')
      null = (level.get('correlation_null') or {}).get(block) or {}
      partial = (level.get('partial_correlation') or {}).get(block)
      interval = '-' if null.get('low') is None else f"[{null['low']:.3f}, {null['high']:.3f}]"
      lines.append(f"| {name} | {level['t']:.2f} | {block} | {fmt(level['correlation'].get(block))} | {interval} | "
                   f"{fmt(null.get('p_value'), '.3g')} | {fmt(partial)} | {fmt(level.get('risky_error_ratio'))} |")
  return lines


def write_inception_report(workdir, rows):
  """Appends the FID Inception's figures of the 1-step PD and SFERD students (and R with them) to the report."""
  summary = study_report.summarize(rows, extractor=rows[0]['extractor'])
  cells = {c['arm']: c for c in summary['cells'] if c['num_steps'] == 1}
  lines = ['', '## Inception FID at 1 step (the TF-2015 FID network; 16x16 samples resized to 299)', '']
  lines += [f"- {arm}: {study_report.format_interval(cells[arm])}" for arm, _, _ in INCEPTION_ARMS if arm in cells]
  if summary['ratio_1step'] is not None:
    ratio = study_report.format_interval(summary['ratio_1step'], key='ratio', digits=3)
    lines.append(f'- R = FID(sferd) / FID(pd): {ratio}')
  files.append_text(os.path.join(workdir, 'results.md'), '\n'.join(lines) + '\n')
  results = files.read_json(os.path.join(workdir, 'results.json'))
  _write_json(os.path.join(workdir, 'results.json'), dict(results, inception=dict(rows=rows, summary=summary)))


def write_analysis_report(workdir, analyses):
  """Appends the analyses' table to results.md and their summaries to results.json."""
  files.append_text(os.path.join(workdir, 'results.md'), '\n'.join(analysis_lines(analyses)) + '\n')
  results = files.read_json(os.path.join(workdir, 'results.json'))
  _write_json(os.path.join(workdir, 'results.json'), dict(results, analyses=analyses))


def analysis_unit(config, workdir, seed, results_dir):
  """The analyses' summaries: restored, or computed and mirrored."""
  relative = os.path.join('analyze', 'summaries.json')
  _restore(results_dir, workdir, relative)
  path = os.path.join(workdir, relative)
  if not files.exists(path):
    _write_json(path, run_analyses(config, workdir, seed))
    _mirror(results_dir, workdir, relative)
  return files.read_json(path)


def run_study(config, workdir):
  """Runs (or resumes) the whole study; writes <workdir>/results.{json,md} and fid_vs_steps.png; returns the
  report's summary."""
  study = config.study
  results_dir = study.results_dir and files.absolute(study.results_dir)
  if study.inception_weights and not files.isfile(study.inception_weights):
    raise errors.ConfigError(
        f'config.study.inception_weights: {study.inception_weights} does not exist. Make it once with `python -m '
        'sferd_jax.evaluation.export_inception SRC.pt OUT.npz` (README, "Evaluation"), or pass '
        '--config.study.inception_weights= to score with the classifier alone.')
  # The teacher: one for every arm and seed.
  _restore(results_dir, workdir, layout.RunLayout('').teacher_model)
  base = without_study(config)
  pipeline.run_phase(base, workdir, 'teacher')
  _mirror(results_dir, workdir, layout.RunLayout('').teacher_model)
  # One feature space for every run: the classifier, trained once.
  classifier_dir = None
  if config.evaluate.features != 'inception' and not config.evaluate.inception_weights:
    relative = layout.RunLayout('').classifier_dir
    _restore(results_dir, workdir, relative)
    evaluate.classifier_feature_fn(base, workdir)
    _mirror(results_dir, workdir, relative)
    classifier_dir = os.path.join(workdir, relative)
  rows, analyses = [], None
  for i, seed in enumerate(study.seeds):
    relative = os.path.join(f'seed_{seed}', ROWS_JSON)
    _restore(results_dir, workdir, relative)
    path = os.path.join(workdir, relative)
    if files.exists(path):
      logging.info('study: seed %d finished (%s); skipping', seed, path)
    else:
      _write_json(path, run_seed(config, workdir, seed, first_seed=i == 0, classifier_dir=classifier_dir))
      _mirror(results_dir, workdir, relative)
    rows += files.read_json(path)
    if i == 0 and study.analyze:  # while the first seed's models are on this machine
      analyses = analysis_unit(config, workdir, seed, results_dir)
  extractors = sorted({r['extractor'] for r in rows})
  main = next((e for e in extractors if not evaluate.is_inception(e)), extractors[0] if extractors else None)
  summary = study_report.write_report([r for r in rows if r['extractor'] == main], workdir)
  inception = [r for r in rows if evaluate.is_inception(r['extractor'])]
  if inception and main is not None and not evaluate.is_inception(main):
    write_inception_report(workdir, inception)
  if analyses is not None:
    write_analysis_report(workdir, analyses)
  for name in ('results.json', 'results.md', 'fid_vs_steps.png'):
    if results_dir and files.exists(os.path.join(workdir, name)):
      files.copy(os.path.join(workdir, name), os.path.join(results_dir, name))
  logging.info('study: wrote %s', os.path.join(workdir, 'results.md'))
  return summary
