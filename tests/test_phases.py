"""training/phases.py: every phase built in one place, and a new phase is a spec builder and a jobs function."""

import dataclasses
import os

import jax
import pytest

from sferd_jax import exports
from sferd_jax import sharding
from sferd_jax.training import loop
from sferd_jax.training import phases
import tiny


def test_specs_of_every_phase_and_their_seeds():
  """The data and noise seeds are config.seed + the phase's offset (teacher 0, distill 1, semantic 2, latent 3,
  consistency 4): resumes and the quickstart's numbers rely on them."""
  config = tiny.load_config()
  specs = {name: phases.build(config, name) for name in phases.PHASES}
  assert {name: spec.seed - config.seed for name, spec in specs.items()} == {
      'teacher': 0, 'distill': 1, 'semantic': 2, 'latent': 3, 'consistency': 4}
  for name, spec in specs.items():
    assert spec.name == name and spec.train_config == config[name]
  assert specs['distill'].meta['training']['batch_size'] == config.distill.batch_size
  with pytest.raises(KeyError):
    phases.build(config, 'evaluate')  # not a trained phase


def test_a_new_phase_is_a_spec_builder_and_a_jobs_function(tmp_path, monkeypatch):
  """Registered in PHASES, a phase is trained, exported, loadable, and skipped once done."""
  config = tiny.load_config()

  def again_spec(config):
    return dataclasses.replace(phases.teacher_spec(config), name='again', seed=config.seed + 7)

  def again_jobs(config, run, spec, mesh):
    del mesh
    yield phases.Job('again', os.path.join(run.workdir, 'again'), lambda: phases.Inputs(
        batches=phases.make_batches(config, spec), rng=jax.random.key(spec.seed),
        info=phases.model_info(config, name='again', phase='again', num_steps=4)))

  monkeypatch.setitem(phases.PHASES, 'again', (again_spec, again_jobs))
  mesh = sharding.make_mesh()
  [info] = phases.run(config, str(tmp_path), 'again', mesh=mesh)
  model = exports.load(str(tmp_path / 'again'))
  assert model.config.phase == 'again' and info['summary']['train_steps'] == config.teacher.train_steps
  assert model.sample(jax.random.key(0), num_samples=2).shape == (2, 8, 8, 1)

  def refuse(*args, **kwargs):
    raise AssertionError('a finished job trained again')

  monkeypatch.setattr(loop, 'run_phase', refuse)
  assert phases.run(config, str(tmp_path), 'again', mesh=mesh) == [exports.read_info(model.path)]
