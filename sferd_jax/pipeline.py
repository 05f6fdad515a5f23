"""A run: the phases of config.phases in order (teacher -> distill -> semantic -> latent -> evaluate), each resuming
or skipping when done, in one run folder (layout.py). What each phase trains is in training/phases.py."""

import os

from absl import logging
import jax
import numpy as np

from sferd_jax import config as config_lib
from sferd_jax.evaluation import evaluate
from sferd_jax import exports
from sferd_jax import files
from sferd_jax import images as images_lib
from sferd_jax import layout
from sferd_jax import progress
from sferd_jax import sharding
from sferd_jax.training import phases


def run_pipeline(config, workdir):
  """Runs every phase in config.phases, in order, skipping finished ones; logs the whole run's progress."""
  mesh = sharding.make_mesh()
  for name in config.phases:  # fail before any work, not after the phases before the one that cannot run
    _check(config, workdir, name, mesh, before=config.phases[:config.phases.index(name)])
  trained = [name for name in config.phases if name in phases.PHASES]
  run = progress.RunProgress({name: (phases.planned_jobs(config, name),
                                     config[name].train_steps * config[name].batch_size) for name in trained})

  def job_done(name, *, trained):
    run.job_done(name, trained=trained)
    logging.info('%s', run.line(f'a {name} job ' + ('done' if trained else 'was already done')))

  for i, name in enumerate(config.phases):  # validate() has checked that each is one of config.PHASES
    logging.info('%s', run.line(f'phase {i + 1}/{len(config.phases)}: {name}'))
    run.phase_starts()
    run_phase(config, workdir, name, mesh=mesh, on_job_done=job_done)
  logging.info('%s', run.line('finished'))


def run_phase(config, workdir, name, *, mesh=None, on_job_done=None):
  """Runs one phase of config.PHASES in the run folder, resuming or skipping what is done."""
  mesh = mesh or sharding.make_mesh()
  _check(config, workdir, name, mesh)
  if name == 'evaluate':
    evaluate.run_evaluate(config, workdir, mesh=mesh)
    return
  infos = phases.run(config, workdir, name, mesh=mesh, on_job_done=on_job_done)
  if name == 'distill':
    write_stage_table(layout.RunLayout(workdir), infos)
  if name in ('distill', 'consistency'):
    write_comparison(config, workdir)


def _check(config, workdir, name, mesh, *, before=()):
  """What can be checked before a phase does any work: its batch splits over the devices, and the teacher distill
  or consistency distils exists (unless a phase before it in this run trains it)."""
  if name in phases.PHASES:
    sharding.check_batch_size(config[name].batch_size, mesh, what=f'config.{name}.batch_size')
  if name in ('distill', 'consistency') and 'teacher' not in before:
    phases.check_teacher(config, workdir, name)


def write_stage_table(run, infos):
  """distill/stages.json and stages.md: one row per stage, from each stage's export (process 0 writes)."""
  sharding.on_process_zero(lambda: _write_stage_table(run, infos), what='writing the stage table')


def _write_stage_table(run, infos):
  rows = [dict(stage=info['stage'], teacher_steps=2 * info['num_steps'], student_steps=info['num_steps'],
               **{k: info['summary'][k] for k in ('final_loss', 'wall_s', 'images_per_s', 'compile_s')})
          for info in infos]
  files.write_json_atomic(run.stage_table + '.json', rows)
  lines = ['| stage | steps (teacher -> student) | final loss | wall time | images/s | compile s |',
           '|---|---|---|---|---|---|']
  lines += [f"| {r['stage']} | {r['teacher_steps']} -> {r['student_steps']} | {r['final_loss']:.5f} | "
            f"{r['wall_s']:.0f} s | {r['images_per_s']:.1f} | {r['compile_s']:.1f} |" for r in rows]
  files.write_text_atomic(run.stage_table + '.md', '\n'.join(lines) + '\n')


def write_comparison(config, workdir, *, student_steps=(4, 2, 1), num_samples=8):
  """samples/comparison.png: the teacher (top row), the students of `student_steps` and the consistency model (at its
  own step count), from the same noise.

  Process 0 alone loads, samples and writes (a load onto one process's devices involves that process only).
  """
  sharding.on_process_zero(lambda: _write_comparison(config, workdir, student_steps, num_samples),
                           what='writing the comparison grid')


def _write_comparison(config, workdir, student_steps, num_samples):
  run = layout.RunLayout(workdir)
  candidates = [('teacher', run.teacher_model)]
  for stage in range(1, config_lib.num_stages(config) + 1):
    if config.distill.start_num_steps // 2**stage in student_steps:
      candidates.append((f'stage_{stage}', run.stage_model(stage)))
  candidates.append(('consistency', run.consistency_model))
  models = [(name, exports.load(path)) for name, path in candidates if layout.is_exported(path)]
  if not models:
    return
  rows = [model.sample(jax.random.key(config.seed), num_samples=num_samples) for _, model in models]
  names = [f'{name} ({model.config.num_steps} steps)' for name, model in models]
  path = os.path.join(run.samples_dir, 'comparison.png')
  images_lib.save_grid(path, np.concatenate(rows), columns=num_samples, row_labels=names)
  files.write_text_atomic(os.path.join(run.samples_dir, 'comparison.txt'), 'rows, top to bottom:\n'
                          + '\n'.join(names) + '\n')
  logging.info('wrote %s: rows %s', path, ', '.join(names))

