"""The one loop every training phase runs: data -> step -> metrics -> checkpoint -> sample grid.

Phases differ only by their step function, its extra arguments (a teacher's parameters, a step count) and their
config section. Running the same command again resumes from the last checkpoint; since batches and noise are
functions of the step number, the resumed run computes what the uninterrupted one would have.
"""

import dataclasses
import functools
import json
import math
import os
import time
import weakref
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview

from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax import files
from sferd_jax import images as images_lib
from sferd_jax import progress
from sferd_jax import sharding
from sferd_jax.training import board as board_lib
from sferd_jax.training import checkpointing
from sferd_jax.training import steps as steps_lib


@dataclasses.dataclass
class Phase:
  """One training phase (the teacher, a distillation stage, the semantic predictor, ...)."""
  name: str                                     # for logs: 'teacher', 'distill stage 2/8'
  directory: str                                # checkpoints/, samples/, metrics.jsonl, summary.json go here
  train_config: Any                             # a training_config() section
  step: Callable                                # step(state, batch, rng, *extra) -> (state, metrics)
  init_state: Callable[..., Any]                # init_state(*init_args) -> TrainState, called under jit
  init_args: tuple = ()                         # arrays for init_state (a teacher's params), not constants
  extra_args: tuple = ()                        # replicated arguments after rng (teacher params, step count)
  meta: dict = dataclasses.field(default_factory=dict)  # must match on resume (config, teacher fingerprint)
  sample_fn: Optional[Callable[[Any], np.ndarray]] = None  # params -> uint8 images, for grids
  # The config key each top-level meta key comes from (None: not a setting, e.g. a teacher's fingerprint), so a
  # refused resume names the key to change, and config.allow_changes can let a resume change it.
  config_keys: dict = dataclasses.field(default_factory=dict)
  allow_changes: tuple = ()                     # config keys (or their prefixes) a resume may change
  fixed_keys: tuple = ()                        # config keys (or prefixes) no resume may change: the architecture
  profile_steps: int = 0                        # calls after the first traced into <phase>/tensorboard (process 0)


def cost_flops(lowered):
  """Total FLOPs of one call from XLA's HLO cost analysis of the lowered (pre-compilation) HLO; None if unknown.

  Not the compiled executable's analysis: on GPU that leaves out the convolutions XLA hands to cuDNN
  (shared/research/anchor_gpu_bench.md). Lowered.cost_analysis() is unimplemented on PJRT plugin backends (the
  CUDA plugin), so the CPU client analyses the HLO, as the anchor's count did: every platform gets the same count.
  """
  # A private function: the only route to the HLO cost analysis on plugin backends. Where it fails (no CPU
  # backend, e.g. JAX_PLATFORMS=cuda, or a jaxlib that moved it), the lowering's own analysis is the fallback.
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    from jax.extend import backend  # pylint: disable=g-import-not-at-top
    cost = _jax.hlo_module_cost_analysis(backend.get_backend('cpu'), lowered.compiler_ir('hlo').as_hlo_module())
  except Exception:  # pylint: disable=broad-except
    try:
      cost = lowered.cost_analysis()
    except Exception:  # pylint: disable=broad-except
      return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


COMMON_METRICS = ('step', 'loss', 'grad_norm', 'learning_rate', 'images_per_s', 'tflops_per_s')


def phase_metrics(record):
  """The metrics a phase's step adds to the common ones (the semantic phase's code sensitivity, ...)."""
  return [k for k in record if k not in COMMON_METRICS]


def _read_metrics(path):
  """(step, line) of each record in metrics.jsonl. A line that does not parse (one a kill cut short) is skipped
  with a warning: losing a log line must not stop a resume."""
  records = []
  with files.open_file(path, 'rb') as f:  # bytes: a line that is not UTF-8 is one more unreadable line, not an error
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        line = raw.decode('utf-8')
        records.append((int(json.loads(line)['step']), line.rstrip('\n') + '\n'))
      except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        logging.warning('%s: skipping unreadable line %d: %.80r', path, number, raw)
  return records


class MetricsLog:
  """metrics.jsonl in the phase folder; a resumed run drops what came after its checkpoint."""

  def __init__(self, directory, *, resume_step):
    self.path = os.path.join(directory, 'metrics.jsonl')
    if jax.process_index() != 0:
      self.path = None
      return
    kept = []
    if files.exists(self.path):
      kept = [line for step, line in _read_metrics(self.path) if step <= resume_step]
    files.write_text_atomic(self.path, ''.join(kept))  # a kill now leaves the old log or the new one

  def write(self, record):
    if self.path:
      files.append_text(self.path, json.dumps(record) + '\n')


def record_diff(saved, now, prefix=''):
  """[(key path, saved value, new value)] where two records differ; keys one of them lacks (a record written before
  the key existed) are not compared."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return [d for k in now if k in saved for d in record_diff(saved[k], now[k], f'{prefix}{k}.')]
  return [] if saved == now else [(prefix.rstrip('.'), saved, now)]


def config_key(phase, path):
  """The config key of a meta key path ('training.optimizer.learning_rate' -> 'distill.optimizer.learning_rate'),
  or None when the value is not a setting of this config (a fingerprint of an earlier phase's export)."""
  top, _, rest = path.partition('.')
  base = phase.config_keys.get(top)
  return None if base is None else '.'.join(p for p in (base, rest) if p)


def _under(key, prefixes):
  return any(key == p or key.startswith(p + '.') for p in prefixes)


def allowed(key, allow_changes, fixed_keys=()):
  """Whether config.allow_changes lets `key` change; never for a key of fixed_keys (the checkpoint could not be
  read into the new architecture)."""
  return key is not None and _under(key, allow_changes) and not _under(key, fixed_keys)


def check_resume(phase, saved_meta):
  """The differences between phase.meta and a checkpoint's record that config.allow_changes lets this resume make
  ([{'key', 'saved', 'now'}]); any other difference is an IncompatibleRunError listing each one and its fix."""
  diffs = [(config_key(phase, path), path, a, b)
           for path, a, b in record_diff(saved_meta.get('config', {}), config_lib.to_json(phase.meta))]
  if any(not allowed(key, phase.allow_changes, phase.fixed_keys) for key, *_ in diffs):
    listed = '; '.join(f'{key or path}: saved {a!r}, now {b!r}' + ('' if key else ' (an earlier phase\'s export)')
                       for key, path, a, b in diffs)
    keys = tuple(key for key, *_ in diffs if key)
    changeable = all(key and not _under(key, phase.fixed_keys) for key, *_ in diffs)
    fix = (f'To continue it with the new values, rerun with --config.allow_changes="{keys!r}" (the change is '
           f'recorded in its checkpoints and summary). ' if keys and changeable else '')
    raise errors.IncompatibleRunError(
        f'{phase.directory} holds a run of {phase.name} started with other settings: {listed}. It is never '
        f'overwritten. {fix}Otherwise restore the settings it was started with, or use a new --workdir.')
  return [dict(key=key, saved=a, now=b) for key, _, a, b in diffs]


# step function -> {argument signature: (compiled, seconds, flops)}. Distillation stages pass the same step
# function with same-shaped arguments (a teacher's params, a traced step count), so all stages share one executable.
_COMPILED = weakref.WeakKeyDictionary()


def compile_step(step, mesh, args):
  """AOT-compiles scan_steps(step) over mesh for args, once per (step, signature): (compiled, seconds, flops)."""
  leaves, treedef = jax.tree.flatten(args)
  signature = (mesh, treedef, tuple((x.shape, x.dtype, getattr(x, 'sharding', None)) for x in leaves))
  cache = _COMPILED.setdefault(step, {})
  if signature in cache:
    compiled, _, flops = cache[signature]
    return compiled, 0.0, flops
  start = time.perf_counter()
  jitted = sharding.jit_step(steps_lib.scan_steps(step), mesh, num_extra_args=len(args) - 3)
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  cache[signature] = (compiled, seconds, _call_flops(jitted, lowered, args))
  return cache[signature]


def _call_flops(jitted, lowered, args):
  """FLOPs of one call of K = steps_per_call steps.

  HLO cost analysis counts a while loop's body once, and scan_steps keeps its loop rolled off CPU, so for K > 1 one
  step is lowered (on a one-step slice of the batches; nothing is compiled) and counted K times.
  """
  num_steps = jax.tree.leaves(args[1])[0].shape[0]
  if num_steps > 1:
    one_step = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), args[1])
    lowered = jitted.lower(args[0], one_step, *args[2:])
  flops = cost_flops(lowered)
  return flops * num_steps if flops else None


def _check_steps_per_call(phase, latest=None):
  """The loop strides from the checkpoint's step (latest) by steps_per_call and must land on train_steps exactly."""
  cfg = phase.train_config
  if cfg.train_steps % cfg.steps_per_call:
    raise errors.ConfigError(
        f'{phase.name}: steps_per_call={cfg.steps_per_call} does not divide train_steps={cfg.train_steps}; set '
        f'steps_per_call to a divisor of it, e.g. {math.gcd(cfg.train_steps, cfg.steps_per_call)}')
  if latest is not None and latest < cfg.train_steps and latest % cfg.steps_per_call:
    raise errors.ConfigError(
        f'{phase.name}: the checkpoint in {phase.directory} is at step {latest}; steps_per_call='
        f'{cfg.steps_per_call} does not divide it, so the run would not end at train_steps={cfg.train_steps}. '
        f'Resume with steps_per_call={math.gcd(latest, cfg.train_steps)} (or another divisor of both {latest} '
        f'and {cfg.train_steps}).')


def _write_parameter_overview(phase, state):
  """<phase>/parameters.txt: clu's table of the trained parameters (name, shape, dtype, size); its total is logged."""
  if jax.process_index() != 0:
    return
  table = parameter_overview.get_parameter_overview(state.params, include_stats=False)
  files.write_text_atomic(os.path.join(phase.directory, 'parameters.txt'), table + '\n')
  logging.info('%s: %s (table in %s)', phase.name, table.splitlines()[-1],
               os.path.join(phase.directory, 'parameters.txt'))


def _interval_values(calls):
  """The metrics of a log interval's calls, through clu's metrics: each step's value averaged over the interval,
  except the learning rate, whose last value is the rate now."""
  steps = {k: jnp.concatenate([jnp.ravel(call[k]) for call in calls]) for k in calls[-1]}
  steps['learning_rate'] = steps['learning_rate'][-1:]
  collection = _interval_metrics(tuple(sorted(steps))).single_from_model_output(**steps)
  return {k: float(v) for k, v in jax.device_get(collection.compute()).items()}


@functools.lru_cache(maxsize=None)
def _interval_metrics(keys):
  return clu_metrics.Collection.create(**{
      k: (clu_metrics.LastValue if k == 'learning_rate' else clu_metrics.Average).from_output(k) for k in keys})


class _Profiler:
  """jax.profiler's trace of phase.profile_steps calls from `first_step`, on process 0, into <phase>/tensorboard
  (TensorBoard's profile tab; a bucket run folder gets it when the trace ends)."""

  def __init__(self, phase, *, first_step):
    self.phase, self.first_step, self.tracing, self.local = phase, first_step, False, None
    per_call = phase.train_config.steps_per_call
    self.last_step = first_step + (phase.profile_steps - 1) * per_call
    self.enabled = phase.profile_steps > 0 and jax.process_index() == 0

  def before(self, step):
    if self.enabled and step == self.first_step:
      self.local = files.local_folder(os.path.join(self.phase.directory, board_lib.SUBFOLDER))
      jax.profiler.start_trace(self.local)
      self.tracing = True

  def after(self, step, state):
    if self.tracing and step >= self.last_step:
      jax.block_until_ready(state)
      self.stop()

  def stop(self):
    if not self.tracing:
      return
    self.tracing = False
    destination = os.path.join(self.phase.directory, board_lib.SUBFOLDER)
    try:
      jax.profiler.stop_trace()
    finally:
      files.upload_folder(self.local, destination)
    logging.info('%s: profiled %d calls into %s (TensorBoard: the profile tab)', self.phase.name,
                 self.phase.profile_steps, destination)


def _write_grid(phase, state, step, board=None):
  if phase.sample_fn is not None and jax.process_index() == 0:
    grid_path = os.path.join(phase.directory, 'samples', f'step_{step:08d}.png')
    samples = phase.sample_fn(sharding.host_local(state.export_params))
    images_lib.save_grid(grid_path, samples)
    if board is not None:
      board.image('samples', images_lib.grid(samples), step)
    logging.info('%s: wrote %s', phase.name, grid_path)


def _finish(phase, state, summary, board=None):
  """The final grid, the loss curve and summary.json, written after the last checkpoint (which holds the
  summary)."""
  grid_path = os.path.join(phase.directory, 'samples', f'step_{phase.train_config.train_steps:08d}.png')
  if not files.exists(grid_path):  # a skipped phase writes only what a kill left unwritten
    _write_grid(phase, state, phase.train_config.train_steps, board)
  if jax.process_index() == 0:
    plot_loss(os.path.join(phase.directory, 'metrics.jsonl'), os.path.join(phase.directory, LOSS_PNG),
              title=phase.name)
    files.write_json_atomic(os.path.join(phase.directory, 'summary.json'), summary)


LOSS_PNG = 'loss.png'


def plot_loss(metrics_path, path, *, title):
  """The loss curve of a phase's metrics.jsonl as a PNG, for readers without TensorBoard (skipped without
  matplotlib)."""
  records = [json.loads(line) for _, line in _read_metrics(metrics_path)] if files.exists(metrics_path) else []
  if not records:
    return
  fig = images_lib.optional_figure((6, 3.5), purpose=f'the loss curve ({path})')
  if fig is None:
    return
  ax = fig.add_subplot()
  ax.plot([r['step'] for r in records], [r['loss'] for r in records], '-o', ms=2)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (mean over each log interval)')
  ax.set_yscale('log' if all(r['loss'] > 0 for r in records) else 'linear')
  ax.set_title(title)
  images_lib.save_figure(fig, path, dpi=100)


def run_phase(phase, *, batches, mesh, rng):
  """Trains phase to train_config.train_steps, resuming if it can. Returns (final state, summary dict)."""
  cfg = phase.train_config
  per_call = cfg.steps_per_call
  _check_steps_per_call(phase)
  sharding.check_batch_size(cfg.batch_size, mesh, what=f'{phase.name}: batch_size')
  files.makedirs(phase.directory)
  ckpts = checkpointing.PhaseCheckpoints(phase.directory, keep=cfg.keep_checkpoints)
  latest = ckpts.latest_step()
  if latest is not None:
    try:
      check_resume(phase, ckpts.restore_meta(latest))  # before any compilation: a refused resume fails at once
    except errors.CheckpointError:
      pass  # an unreadable record: restore_latest below sets that checkpoint aside
  state = jax.jit(phase.init_state, out_shardings=sharding.replicated(mesh))(
      *sharding.put_replicated(tuple(phase.init_args), mesh))
  restored, saved_meta = ckpts.restore_latest(state, check=lambda meta: check_resume(phase, meta))
  changes = []
  if restored is not None:
    state = restored
    changes = saved_meta.get('changes', []) + [dict(step=int(state.step), **c)
                                               for c in check_resume(phase, saved_meta)]
    for change in changes[len(saved_meta.get('changes', [])):]:
      logging.warning('%s: resuming at step %d with %s changed from %r to %r (config.allow_changes)', phase.name,
                      change['step'], change['key'], change['saved'], change['now'])
    logging.info('%s: resuming from the checkpoint at step %d', phase.name, int(state.step))
  else:
    saved_meta = {}
  elapsed_before = saved_meta.get('elapsed_s', 0.0)
  start_step = int(state.step)
  _check_steps_per_call(phase, start_step or None)
  if start_step >= cfg.train_steps:
    ckpts.close()
    if 'summary' not in saved_meta:
      raise errors.IncompatibleRunError(f'{phase.name}: {phase.directory} holds a run at step {start_step}, past '
                                        f'train_steps={cfg.train_steps}. Raise train_steps, or use a new --workdir.')
    logging.info('%s: already trained (%d steps); skipping', phase.name, start_step)
    _finish(phase, state, saved_meta['summary'])  # a kill after the last checkpoint may have left them unwritten
    return state, saved_meta['summary']

  extra = sharding.put_replicated(phase.extra_args, mesh)
  data = batches.iterate(start_step, per_call)
  first = sharding.put_batch(next(data), mesh)
  compiled, compile_s, flops = compile_step(phase.step, mesh, (state, first, rng) + tuple(extra))
  logging.info('%s: %s; %s per step', phase.name,
               f'compiled in {compile_s:.1f}s' if compile_s else 'reusing the compiled step',
               f'{flops / per_call / 1e9:.1f} GFLOP' if flops else 'FLOPs unknown')

  log = MetricsLog(phase.directory, resume_step=start_step)
  _write_parameter_overview(phase, state)
  interval = []  # the metrics of each call since the last log line (on device): the line holds their mean
  images_per_call = cfg.batch_size * per_call
  timer_start, timer_images = time.perf_counter(), 0
  run_start = time.perf_counter()
  last_record, batch, summary = None, first, None

  def record_of(step):
    values = _interval_values(interval)
    if not all(math.isfinite(v) for v in values.values()):
      section = phase.config_keys.get('training', '<section>')
      raise errors.TrainingDivergedError(
          f'{phase.name}: the loss became {values["loss"]} by step {step} (metrics {values}). The last good '
          f'checkpoint is kept in {ckpts.directory}. To resume from it with a lower learning rate, run the same '
          f'command with --config.{section}.optimizer.learning_rate=<lower> '
          f'--config.allow_changes="(\'{section}.optimizer.learning_rate\',)" (or tighten grad_clip the same way), '
          f'after checking the data.')
    return dict(step=step, **values)

  def summarize():
    return dict(phase=phase.name, train_steps=cfg.train_steps, final_loss=last_record['loss'],
                wall_s=elapsed_before + time.perf_counter() - run_start,
                images_per_s=last_record['images_per_s'], compile_s=compile_s,
                gflop_per_step=flops / per_call / 1e9 if flops else None,
                **{f'final_{k}': last_record[k] for k in phase_metrics(last_record)},
                **({'changes': changes} if changes else {}))

  def save(step):
    nonlocal summary
    meta = {'config': config_lib.to_json(phase.meta), 'phase': phase.name, 'step': step,
            'elapsed_s': elapsed_before + time.perf_counter() - run_start, 'changes': changes}
    if step == cfg.train_steps:  # the finished phase's summary travels with its last checkpoint
      meta['summary'] = summary = summarize()
    ckpts.save(step, state, meta)

  profiler = _Profiler(phase, first_step=start_step + 2 * per_call)  # after a call that may have warmed caches
  board = board_lib.Board(phase.directory, resume_step=start_step, enabled=jax.process_index() == 0,
                          hparams={'phase': phase.name, **phase.meta.get('training', {})})
  try:  # however the loop or the finish ends, the board is closed once (a bucket run folder gets its event files)
    try:
      for step in range(start_step + per_call, cfg.train_steps + 1, per_call):
        profiler.before(step)
        state, metrics = compiled(state, batch, rng, *extra)
        profiler.after(step, state)
        interval.append(metrics)  # no work per call: the mean is taken when a line is written
        timer_images += images_per_call
        if step < cfg.train_steps:
          batch = sharding.put_batch(next(data), mesh)  # overlaps with the device's work
        log_now = step % cfg.log_every < per_call or step == cfg.train_steps
        save_now = step % cfg.checkpoint_every < per_call or step == cfg.train_steps
        if log_now or save_now:
          last_record = record_of(step)  # waits for the device; raises before a NaN state is saved
        if log_now:
          seconds = time.perf_counter() - timer_start
          last_record['images_per_s'] = timer_images / seconds
          if flops:
            last_record['tflops_per_s'] = flops * timer_images / images_per_call / seconds / 1e12
          log.write(last_record)
          board.scalars(last_record)
          interval.clear()
          eta = (cfg.train_steps - step) / (timer_images / cfg.batch_size / seconds)
          logging.info('%s: step %d/%d (%d%%) loss %.5f grad_norm %.3f lr %.2e%s | %.1f img/s | ETA %s',
                       phase.name, step, cfg.train_steps, 100 * step // cfg.train_steps, last_record['loss'],
                       last_record['grad_norm'], last_record['learning_rate'],
                       ''.join(f' {k} {last_record[k]:.4g}' for k in phase_metrics(last_record)),
                       last_record['images_per_s'], progress.format_eta(eta))
          timer_start, timer_images = time.perf_counter(), 0
        if save_now:
          save(step)
        if cfg.sample_every and step % cfg.sample_every < per_call and step < cfg.train_steps:
          _write_grid(phase, state, step, board)
          timer_start, timer_images = time.perf_counter(), 0  # images/s measures training, not the grid
      if summary is None:  # the step at train_steps always checkpoints, with its record; _check_steps_per_call
        # keeps the loop landing on it, so this is a bug, stated rather than a KeyError on a missing record
        raise RuntimeError(f'{phase.name}: the loop from step {start_step} in strides of {per_call} never reached '
                           f'train_steps={cfg.train_steps}')
    finally:
      profiler.stop()
      data.close()
      ckpts.wait()
      ckpts.close()
    _finish(phase, state, summary, board)  # the summary saved with the last checkpoint: a rerun writes the same
  finally:
    board.close()
  return state, summary
