"""The training core: sharded == single device, checkpoints, resume == uninterrupted, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import layout
from sferd_jax import pipeline
from sferd_jax.training import checkpointing
from sferd_jax.training import loop
from sferd_jax.training import phases
from sferd_jax.training import state as state_lib
import tiny


def _teacher_setup(config):
  spec = phases.build(config, 'teacher')
  return spec.step, spec.init


def _batch(config, steps=1):
  return phases.make_batches(config, phases.build(config, 'teacher')).get(0, steps)


def test_sharded_teacher_step_equals_single_device():
  assert jax.device_count() == 4
  config = tiny.load_config()
  step, init = _teacher_setup(config)
  batch = _batch(config, steps=2)
  one, m1 = tiny.run_step_on(jax.devices()[:1], step, init, batch)
  four, m4 = tiny.run_step_on(jax.devices(), step, init, batch)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  assert int(one.step) == int(four.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one.params, four.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one.ema_params, four.ema_params)


def test_step_is_deterministic_and_uses_the_step_counter_for_noise():
  config = tiny.load_config()
  step, init = _teacher_setup(config)
  batch = jax.tree.map(lambda x: x[0], _batch(config))
  state = jax.jit(init)()
  run = jax.jit(step)
  _, a = run(state, batch, jax.random.key(0))
  _, b = run(state, batch, jax.random.key(0))
  _, c = run(state.replace(step=state.step + 1), batch, jax.random.key(0))
  assert float(a['loss']) == float(b['loss'])
  assert float(a['loss']) != float(c['loss'])


def test_checkpoint_save_restore_round_trip(tmp_path):
  config = tiny.load_config()
  _, init = _teacher_setup(config)
  state = jax.jit(init)()
  state = state.replace(step=jnp.int32(7), params=jax.tree.map(lambda p: p + 0.5, state.params))
  ckpts = checkpointing.PhaseCheckpoints(str(tmp_path), keep=2)
  ckpts.save(7, state, {'config': {'a': 1}, 'step': 7})
  ckpts.wait()
  fresh = jax.jit(init)()
  restored, meta = ckpts.restore(ckpts.latest_step(), fresh)
  ckpts.close()
  assert meta['step'] == 7 and int(restored.step) == 7
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


class _Interrupting:
  """Wraps Batches: the iterator of its `on_call`-th iterate() (i.e. of that phase or stage) raises
  KeyboardInterrupt, like a kill, when asked for its batch number `after`."""

  def __init__(self, batches, after, on_call=1):
    self.batches, self.after, self.on_call, self.calls = batches, after, on_call, 0

  def __getattr__(self, name):  # get(), ...: the semantic phase reads its first batch for the grids
    return getattr(self.batches, name)

  def iterate(self, start, per_call):
    self.calls += 1
    inner = self.batches.iterate(start, per_call)
    return _Killing(inner, self.after) if self.calls == self.on_call else inner


class _Killing:

  def __init__(self, inner, after):
    self.inner, self.after, self.count = inner, after, 0

  def __next__(self):
    self.count += 1
    if self.count == self.after:
      raise KeyboardInterrupt('killed')
    return next(self.inner)

  def close(self):
    self.inner.close()


def _metrics(workdir):
  with open(os.path.join(workdir, 'teacher', 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k in ('step', 'loss', 'grad_norm')} for line in f]


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
  config = tiny.load_config(**{'teacher.log_every': 1})
  straight = str(tmp_path / 'straight')
  pipeline.run_phase(config, straight, 'teacher')

  resumed = str(tmp_path / 'resumed')
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: _Interrupting(real(*a, **k), after=4))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, resumed, 'teacher')  # killed after step 3; the last checkpoint is step 2
  assert checkpointing.PhaseCheckpoints(os.path.join(resumed, 'teacher'), keep=2).latest_step() == 2
  assert not layout.is_exported(os.path.join(resumed, 'teacher', 'model'))
  monkeypatch.setattr(phases, 'make_batches', real)
  pipeline.run_phase(config, resumed, 'teacher')

  a, b = exports.load(straight), exports.load(resumed)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert _metrics(straight) == _metrics(resumed)
  # A finished phase is skipped, and its export is never rewritten.
  mtime = os.path.getmtime(os.path.join(resumed, 'teacher', 'model', 'model.json'))
  pipeline.run_phase(config, resumed, 'teacher')
  assert os.path.getmtime(os.path.join(resumed, 'teacher', 'model', 'model.json')) == mtime
  with pytest.raises(errors.CheckpointError, match='never overwritten'):
    exports.export_model(os.path.join(resumed, 'teacher', 'model'), trees={'params': a.params}, info={})
  # The export loads with its config, and samples.
  assert b.config.model.to_dict() == config_lib.to_json(config.model) and b.config.phase == 'teacher'
  images = b.sample(jax.random.key(0), num_samples=3, num_steps=2)
  assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8


def test_resume_with_another_architecture_is_refused(tmp_path, monkeypatch):
  config = tiny.load_config()
  workdir = str(tmp_path / 'run')
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: _Interrupting(real(*a, **k), after=4))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, workdir, 'teacher')
  monkeypatch.setattr(phases, 'make_batches', real)
  changed = tiny.load_config(**{'model.ch': 32})
  with pytest.raises(errors.IncompatibleRunError, match=r'model\.ch: saved 16, now 32'):
    pipeline.run_phase(changed, workdir, 'teacher')


def test_nan_loss_stops_with_a_clear_error_and_saves_nothing(tmp_path, monkeypatch):
  config = tiny.load_config()
  real = phases.make_batches

  class NaNBatches:
    def __init__(self, batches):
      self.batches = batches

    def iterate(self, start, per_call):
      inner = self.batches.iterate(start, per_call)

      class It:
        def __next__(self):
          batch = next(inner)
          return dict(batch, image=np.full_like(batch['image'], np.nan))

        def close(self):
          inner.close()

      return It()

  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: NaNBatches(real(*a, **k)))
  with pytest.raises(errors.TrainingDivergedError, match=r'teacher\.optimizer\.learning_rate=<lower> '
                                                         r'--config\.allow_changes='):
    pipeline.run_phase(config, str(tmp_path), 'teacher')
  assert checkpointing.PhaseCheckpoints(str(tmp_path / 'teacher'), keep=2).latest_step() is None


def test_an_unreadable_checkpoint_is_set_aside_and_the_phase_starts_over(tmp_path, monkeypatch):
  """Every file of the only checkpoint overwritten: it is moved to corrupt_checkpoints/ (kept) and the run stops
  saying so (a restore must not silently restart a phase); the next run trains from step 0 to the same model as
  an uninterrupted run."""
  config = tiny.load_config()
  pipeline.run_phase(config, str(tmp_path / 'straight'), 'teacher')
  workdir = str(tmp_path / 'run')
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: _Interrupting(real(*a, **k), after=4))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, workdir, 'teacher')
  monkeypatch.setattr(phases, 'make_batches', real)
  state_dir = os.path.join(workdir, 'teacher', 'checkpoints', '2', 'state')
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  with pytest.raises(errors.CheckpointError, match=r'no checkpoint .* restores: \[2\] were moved to .*Run the same'):
    pipeline.run_phase(config, workdir, 'teacher')
  pipeline.run_phase(config, workdir, 'teacher')
  assert [name.split('_')[0] for name in os.listdir(os.path.join(workdir, 'teacher', 'corrupt_checkpoints'))] == ['2']
  jax.tree.map(np.testing.assert_array_equal, exports.load(str(tmp_path / 'straight')).params,
               exports.load(workdir).params)


def test_load_errors_name_the_problem(tmp_path):
  with pytest.raises(errors.CheckpointError, match='no exported model found'):
    exports.load(str(tmp_path))
  with pytest.raises(errors.CheckpointError, match='does not exist'):
    exports.read_info(str(tmp_path / 'nothing'))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(errors.CheckpointError, match='--workdir'):
    checkpointing.PhaseCheckpoints(str(blocker / 'teacher'), keep=1)


def test_export_from_four_devices_loads_on_one(tiny_run):
  """A model exported by a 4-device run (the test session) loads and samples in a 1-device process."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir, _ = tiny_run
  code = ('import jax, sferd_jax; assert jax.device_count() == 1; '
          f'm = sferd_jax.load({workdir!r}); print(m.sample(jax.random.key(0), num_samples=2).shape)')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([tiny.ROOT, os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '(2, 8, 8, 1)' in out.stdout


def test_ema_warms_up_then_uses_its_decay():
  np.testing.assert_allclose(state_lib.ema_decay_at(0, 0.999), 0.1, rtol=1e-6)
  np.testing.assert_allclose(state_lib.ema_decay_at(90, 0.999), 91 / 100, rtol=1e-6)
  np.testing.assert_allclose(state_lib.ema_decay_at(100_000, 0.999), 0.999, rtol=1e-6)
  params = {'w': jnp.zeros(3)}
  tx, _ = state_lib.make_optimizer(tiny.load_config().teacher.optimizer, 10)
  state = state_lib.TrainState.create(params=params, tx=tx, ema_decay=0.999)
  grads = {'w': jnp.ones(3)}
  new = state_lib.apply_gradients(state, grads, tx=tx, ema_decay=0.999)
  # Step 0: decay 0.1, so the EMA is 0.9 of the way to the updated params.
  np.testing.assert_allclose(new.ema_params['w'], 0.9 * new.params['w'], rtol=1e-6)
  assert state_lib.TrainState.create(params=params, tx=tx, ema_decay=0.0).ema_params is None


def test_killed_between_last_checkpoint_and_export(tmp_path):
  """A phase killed after its final checkpoint (summary.json and the export not yet written) finishes on rerun."""
  config = tiny.load_config()
  workdir = str(tmp_path)
  pipeline.run_phase(config, workdir, 'teacher')
  exported = exports.load(workdir).params
  import shutil  # pylint: disable=g-import-not-at-top
  summary_path = os.path.join(workdir, 'teacher', 'summary.json')
  with open(summary_path) as f:
    summary = json.load(f)
  shutil.rmtree(os.path.join(workdir, 'teacher', 'model'))
  os.remove(summary_path)
  pipeline.run_phase(config, workdir, 'teacher')
  jax.tree.map(np.testing.assert_array_equal, exports.load(workdir).params, exported)
  with open(summary_path) as f:  # rewritten from the last checkpoint: the same summary, not a new one
    assert json.load(f) == summary
  assert exports.read_info(os.path.join(workdir, 'teacher', 'model'))['summary'] == summary


def test_lowering_train_steps_below_an_unfinished_run_is_refused(tmp_path, monkeypatch):
  config = tiny.load_config()
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: _Interrupting(real(*a, **k), after=4))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, str(tmp_path), 'teacher')  # killed after step 3; the last checkpoint is step 2
  monkeypatch.setattr(phases, 'make_batches', real)
  with pytest.raises(errors.IncompatibleRunError, match='teacher.train_steps: saved 4, now 1'):
    pipeline.run_phase(tiny.load_config(**{'teacher.train_steps': 1}), str(tmp_path), 'teacher')
  allowed = {'teacher.train_steps': 1, 'allow_changes': ('teacher.train_steps',)}
  with pytest.raises(errors.IncompatibleRunError, match='past train_steps=1'):
    pipeline.run_phase(tiny.load_config(**allowed), str(tmp_path), 'teacher')


def test_resume_with_steps_per_call_not_dividing_the_checkpoint_is_refused(tmp_path, monkeypatch):
  """Striding from step 1 by 2 would pass train_steps=4 by; the resume is refused before any work instead."""
  config = tiny.load_config(**{'teacher.checkpoint_every': 1})
  real = phases.make_batches
  monkeypatch.setattr(phases, 'make_batches', lambda *a, **k: _Interrupting(real(*a, **k), after=3))
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_phase(config, str(tmp_path), 'teacher')  # killed in step 2; the last checkpoint is step 1
  monkeypatch.setattr(phases, 'make_batches', real)
  with open(tmp_path / 'teacher' / 'metrics.jsonl') as f:
    logged = f.read()
  changed = tiny.load_config(**{'teacher.checkpoint_every': 1, 'teacher.steps_per_call': 2})
  with pytest.raises(errors.ConfigError, match=r'at step 1; steps_per_call=2 does not divide it.*'
                                                   r'steps_per_call=1'):
    pipeline.run_phase(changed, str(tmp_path), 'teacher')
  assert checkpointing.PhaseCheckpoints(str(tmp_path / 'teacher'), keep=2).latest_step() == 1
  with open(tmp_path / 'teacher' / 'metrics.jsonl') as f:
    assert f.read() == logged


def test_bad_batch_size_or_steps_per_call_is_a_config_error_before_any_work(tmp_path):
  assert jax.device_count() == 4
  with pytest.raises(errors.ConfigError, match=r'config\.latent\.batch_size=6 .* multiple of 4'):
    pipeline.run_pipeline(tiny.load_config(**{'latent.batch_size': 6}), str(tmp_path))
  assert not os.path.exists(tmp_path / 'teacher')  # refused before the phases before it ran
  with pytest.raises(errors.ConfigError, match=r'config\.teacher\.batch_size=6'):
    pipeline.run_phase(tiny.load_config(**{'teacher.batch_size': 6}), str(tmp_path), 'teacher')
  with pytest.raises(errors.ConfigError, match='steps_per_call=3 does not divide train_steps=4'):
    pipeline.run_phase(tiny.load_config(**{'teacher.steps_per_call': 3}), str(tmp_path), 'teacher')
  assert not os.path.exists(tmp_path / 'teacher')


def test_metrics_log_skips_a_half_written_line_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
  log = loop.MetricsLog(str(tmp_path), resume_step=2)
  assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
  log.write({'step': 3, 'loss': 0.25})
  assert [json.loads(line)['loss'] for line in path.read_text().splitlines()] == [0.5, 0.4, 0.25]
  # A last record that parses but lost its newline gets one back, so the next record starts its own line.
  path.write_text('{"step": 1, "loss": 0.5}')
  loop.MetricsLog(str(tmp_path), resume_step=1).write({'step': 2, 'loss': 0.4})
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2]
  assert not os.path.exists(str(path) + '.tmp')


def test_load_restores_onto_the_sharding_it_is_given(tiny_run):
  """Training loads a teacher onto its mesh; the default is this process's devices. sample() takes either."""
  from sferd_jax import sharding  # pylint: disable=g-import-not-at-top
  workdir, _ = tiny_run
  mesh = sharding.make_mesh(jax.devices()[:2])
  on_mesh = exports.load(os.path.join(workdir, 'teacher'), sharding=sharding.replicated(mesh))
  default = exports.load(os.path.join(workdir, 'teacher'))
  for leaf in jax.tree.leaves(on_mesh.params):
    assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim)
  for leaf in jax.tree.leaves(default.params):
    assert leaf.sharding.is_fully_replicated and set(leaf.devices()) == set(jax.local_devices())
  np.testing.assert_array_equal(on_mesh.sample(jax.random.key(0), num_samples=4),
                                default.sample(jax.random.key(0), num_samples=4))
