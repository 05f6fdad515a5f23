"""Every training phase, built from the config in one place: its spec (step, state, resume record) and its jobs (the
phase folders it trains and exports). The pipeline, bench/ and the tests build phases only through here.

Adding a phase is a step in steps.py, a spec builder and a jobs function below, and an entry in PHASES.
"""

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sferd_jax import config as config_lib
from sferd_jax import data as data_lib
from sferd_jax.data import codes as codes_lib
from sferd_jax.diffusion import process
from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import files
from sferd_jax import layout
from sferd_jax.models import latent as latent_lib
from sferd_jax.models import semantic as semantic_lib
from sferd_jax.models import unet
from sferd_jax.sferd import guided_teacher
from sferd_jax import sharding
from sferd_jax.training import grids
from sferd_jax.training import loop
from sferd_jax.training import state as state_lib
from sferd_jax.training import steps as steps_lib

# Training keys that do not change what a phase computes: a resume may change them. (steps_per_call only groups
# the same steps into calls; distill's stage keys are covered by student_steps and the teacher fingerprint, and
# consistency's teacher and init by their fingerprints; its num_steps is only what its export samples with, and its
# semantic says whether later phases train a predictor on it.)
RESUMABLE_KEYS = ('log_every', 'checkpoint_every', 'keep_checkpoints', 'sample_every', 'steps_per_call', 'teacher',
                  'start_num_steps', 'end_num_steps', 'init', 'num_steps', 'semantic')
# The config key of each top-level key of a phase's resume record (loop.Phase.config_keys); 'training' and 'loss'
# are the phase's own section. Fingerprints of earlier exports (teacher, student, encoder) are not settings.
META_CONFIG_KEYS = {'model': 'model', 'diffusion': 'diffusion', 'data': 'data', 'seed': 'seed',
                    'attention_guidance': 'sferd.attention_guidance', 'semantic': 'sferd.semantic',
                    'latent': 'sferd.latent', 'num_classes': 'model.num_classes',
                    'student_steps': 'distill.start_num_steps'}
# What a checkpoint's arrays are shaped by: no resume may change it (config.allow_changes cannot).
FIXED_CONFIG_KEYS = ('model', 'diffusion', 'sferd.semantic', 'sferd.latent', 'distill.start_num_steps')
# Model keys that change how a model runs but not its parameters: a teacher trained with dropout 0.2 is
# distilled with dropout 0 (as in progressive distillation), and a float32 export may run in bfloat16.
NOT_ARCHITECTURE = ('dropout', 'dtype')


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """What a phase trains: its step, how its state starts, and what a resume of it must match."""
  name: str                    # the phase, which is also its training section: 'teacher', 'distill', ...
  train_config: Any            # config[name]
  step: Callable               # step(state, batch, rng, *extra) -> (state, metrics), pure
  init: Callable               # init(*init_args) -> TrainState, run under jit
  create: Callable             # create(params) -> TrainState with this phase's optimizer and EMA
  seed: int                    # its data order's seed and its noise key's: config.seed + the phase's offset
  meta: dict                   # the resume record every job of the phase shares (loop.Phase.meta)


@dataclasses.dataclass
class Inputs:
  """What one job trains from, loaded only when its export is missing."""
  batches: Any                 # data_lib.Batches (or CodeBatches): get(step, num_steps) of the phase's examples
  rng: jax.Array               # the job's noise key
  info: dict                   # its export's model.json (the training summary is added)
  meta: dict = dataclasses.field(default_factory=dict)   # the job's own resume record (a teacher's fingerprint)
  init_args: tuple = ()        # arrays for spec.init (a teacher's params)
  extra_args: tuple = ()       # the step's replicated arguments after rng
  sample_fn: Optional[Callable[[Any], np.ndarray]] = None   # params -> uint8 images, for grids
  extra_trees: dict = dataclasses.field(default_factory=dict)  # exported beside 'params'
  step: Optional[Callable] = None  # the job's own step, when it differs from the phase's (a predictor of a
                                   # consistency model applies its student with that model's output type)


@dataclasses.dataclass(frozen=True)
class Job:
  """One phase folder to train and export: the teacher, a distillation stage, a stage's predictor, ..."""
  name: str                    # for logs: 'distill stage 2/5 (16 -> 8 steps)'
  directory: str               # the phase folder; its export is layout.export_of(directory)
  prepare: Callable[[], Inputs]


def build(config, name):
  """The PhaseSpec of phase `name` ('teacher', 'distill', 'semantic' or 'latent') for a config."""
  return PHASES[name][0](config)


def jobs(config, workdir, spec, *, mesh):
  """The jobs of spec's phase in a run folder, in order."""
  return PHASES[spec.name][1](config, layout.RunLayout(workdir), spec, mesh)


def run(config, workdir, name, *, mesh, on_job_done=None):
  """Trains and exports every job of phase `name` that is not exported yet. Returns [model.json of each job].
  on_job_done(name, trained=...) is told of each job as it ends (trained: False when it was already exported)."""
  spec = build(config, name)
  infos = []
  for job in jobs(config, workdir, spec, mesh=mesh):
    finished = layout.is_exported(layout.export_of(job.directory))
    infos.append(train_and_export(spec, job, config=config, mesh=mesh))
    if on_job_done:
      on_job_done(name, trained=not finished)
  return infos


def planned_jobs(config, name):
  """How many jobs phase `name` has under `config` (the teacher: 1; distill: a job per stage; semantic and latent:
  one per stage with a predictor)."""
  if name == 'teacher':
    return 1
  if name == 'distill':
    return config_lib.num_stages(config)
  if name == 'consistency':
    return 1
  return len(predictor_students(config, layout.RunLayout('')))


def train_and_export(spec, job, *, config, mesh):
  """One job: skipped when exported (its architecture checked against the config), else trained to the end of its
  training section (resuming from its last checkpoint) and exported. Returns its model.json."""
  export = layout.export_of(job.directory)
  if layout.is_exported(export):
    check_architecture(export, config)
    logging.info('%s: finished and exported at %s; skipping', job.name, export)
    return exports.read_info(export)
  inputs = job.prepare()
  phase = loop.Phase(name=job.name, directory=job.directory, train_config=spec.train_config,
                     step=inputs.step or spec.step, init_state=spec.init, init_args=inputs.init_args,
                     extra_args=inputs.extra_args, meta=dict(spec.meta, **inputs.meta), sample_fn=inputs.sample_fn,
                     config_keys=dict(META_CONFIG_KEYS, training=spec.name, loss=f'{spec.name}.loss'),
                     allow_changes=tuple(config.allow_changes), fixed_keys=FIXED_CONFIG_KEYS,
                     profile_steps=config.get('profile_steps', 0))
  state, summary = loop.run_phase(phase, batches=inputs.batches, mesh=mesh, rng=inputs.rng)
  info = dict(inputs.info, summary=summary)
  exports.export_model(export, trees={'params': state.export_params, **inputs.extra_trees}, info=info)
  logging.info('%s: exported to %s', job.name, export)
  return info


# Shared pieces.


def make_batches(config, spec):
  """The phase's examples: every job of a phase reads the same ones in the same order (one data seed)."""
  source = data_lib.load_source(data_lib.data_config(config))
  logging.info('data: %s', source)
  return data_lib.Batches(source, global_batch_size=spec.train_config.batch_size, seed=spec.seed,
                          random_flip=config.data.random_flip)


def _optimizer(train_config, state_class=state_lib.TrainState):
  """(tx, its learning-rate schedule, create(params) -> a state_class updated by tx) of a training section."""
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, train_config.train_steps)
  return tx, schedule, lambda params: state_class.create(params=params, tx=tx, ema_decay=train_config.ema_decay)


def training_meta(train_config):
  """What a phase's checkpoints record of its training section, for a resume to match (loop.Phase.meta)."""
  return {k: v for k, v in config_lib.to_json(train_config).items() if k not in RESUMABLE_KEYS}


def distillation_meta(config, train_config):
  """The resume record of a phase that distils the (guided) teacher (distill, consistency): its architecture,
  schedule, data, seed, loss, guidance and training settings."""
  return dict(model=config.model.to_dict(), diffusion=config.diffusion.to_dict(), data=data_record(config),
              seed=config.seed, loss=train_config.loss, attention_guidance=guidance_meta(config),
              training=training_meta(train_config))


def guidance_meta(config):
  """The attention-guidance settings a distillation target used: None when guidance is off (then none matter)."""
  cfg = config.sferd.attention_guidance
  return config_lib.to_json(cfg) if guided_teacher.is_active(cfg) else None


def semantic_settings(config, *, training=False):
  """config.sferd.semantic as a stage's predictor records it: without `stages` (which stages get one changes none
  of them) and, in a phase's resume record (training=True), without the sampling-only `stop_fraction`."""
  skip = ('stages', 'stop_fraction') if training else ('stages',)
  return {k: v for k, v in config.sferd.semantic.to_dict().items() if k not in skip}


def model_info(config, *, name, phase, num_steps, **extra):
  """model.json of a U-Net's export: what load() and the next stage need to know."""
  return dict(name=name, phase=phase, num_steps=num_steps, model=config.model.to_dict(),
              diffusion=config.diffusion.to_dict(), data=data_record(config), **extra)


def data_record(config):
  """What a phase was trained on, for its resumes and the phases after it to compare: the data section with the
  image shape, and for a file dataset (npz) a fingerprint of the file's bytes, so a changed file is caught too."""
  record = data_lib.data_config(config)
  if config.data.name == 'npz' and config.data.path and files.isfile(config.data.path):
    record['content'] = _file_fingerprint(files.absolute(config.data.path), *files.size_and_mtime(config.data.path))
  return record


@functools.lru_cache(maxsize=8)
def _file_fingerprint(path, size, mtime):
  """A file's SHA-256 (16 hex digits), read once per (path, size, mtime): a multi-GB npz is hashed once a run."""
  del size, mtime  # the cache key: a rewritten file is hashed again
  digest = hashlib.sha256()
  with files.open_file(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def check_provenance(config, export_path, what):
  """An earlier phase's export must have been trained on config's data (where its model.json records it), or
  `what` would build on a model of other data. config.allow_changes ('data', 'data.<key>') lets it."""
  saved = exports.read_info(export_path).get('data')
  diffs = [(f'data.{k}', a, b) for k, a, b in loop.record_diff(saved or {}, config_lib.to_json(data_record(config)))]
  refused = [d for d in diffs if not loop.allowed(d[0], tuple(config.allow_changes))]
  if refused:
    raise errors.IncompatibleRunError(
        f'{what} would build on {export_path}, which was trained on other data: '
        + '; '.join(f'{key}: there {a!r}, now {b!r}' for key, a, b in refused)
        + f'. Restore the data config it was trained with, use a new --workdir, or, to build on it anyway, rerun '
        f'with --config.allow_changes="{tuple(key for key, *_ in refused)!r}".')
  for key, a, b in diffs:
    logging.warning('%s builds on %s, trained with %s=%r; now %r (config.allow_changes)', what, export_path, key, a, b)


def check_architecture(export_path, config):
  """An exported model must have the architecture of config.model and the noise schedule of config.diffusion, or
  nothing downstream can use it (a student distilled on another schedule would not match its teacher). Exports
  that record neither (a predictor's, a latent model's) pass."""
  info = exports.read_info(export_path)
  diff = {}
  for section in ('model', 'diffusion'):
    saved, wanted = info.get(section), config_lib.to_json(config[section])
    if saved is None:  # an export older than the section's record: nothing to compare
      continue
    if section == 'model':  # a consistency model has its teacher's parameters: compare the heads
      saved = dict(saved, output_type=process.head_type(saved.get('output_type', '')))
    diff.update({f'{section}.{k}': (saved.get(k), v) for k, v in wanted.items()
                 if saved.get(k) != v and k not in NOT_ARCHITECTURE})
  if diff:
    raise errors.IncompatibleRunError(
        f'{export_path} holds a model whose architecture differs from the config (config key: (saved, config)): '
        f'{diff}. Use a new --workdir, or set these config keys to the saved values.')


def teacher_path(config, workdir):
  """The model stage 1 distils: config.distill.teacher, or the teacher phase's export in the workdir."""
  return files.absolute(config.distill.teacher or layout.RunLayout(workdir).teacher_model)


def stage_teacher_path(config, workdir, stage):
  """The model stage `stage` distils: stage k-1's export, or for stage 1 teacher_path(). Derived, not read from
  model.json (which records absolute paths), so a moved workdir still works."""
  return teacher_path(config, workdir) if stage == 1 else layout.RunLayout(workdir).stage_model(stage - 1)


def check_teacher(config, workdir, phase='distill'):
  """Fails before any work when the teacher `phase` (distill or consistency) distils is missing or has another
  architecture."""
  path = consistency_teacher_path(config, workdir) if phase == 'consistency' else teacher_path(config, workdir)
  if not layout.is_exported(path):
    raise errors.CheckpointError(
        f'no teacher to distil at {path}. Train one first (--mode=train_teacher, or put "teacher" in '
        f'config.phases), or point config.{phase}.teacher at an exported model folder.')
  check_architecture(path, config)
  return path


def load_teacher_of(path, student, *, what, sharding=None):
  """The params of the model at `path` that `student` (a Model) was distilled from, checked against the fingerprint
  its export recorded. what: the student, for errors ('distillation stage 3', 'the consistency model')."""
  if not layout.is_exported(path):
    raise errors.CheckpointError(f'the teacher of {what} is missing at {path}; it is needed to train its semantic '
                                 f'predictor. Restore it, or rerun the phase that distilled {what}.')
  params = exports.load(path, sharding=sharding).params
  expected, found = student.config.get('teacher_fingerprint'), exports.fingerprint(params)
  if expected and found != expected:
    raise errors.CheckpointError(
        f'{path} is not the model {what} was distilled from (fingerprint {found}, expected {expected}). Restore '
        f'that model there, or rerun the phase that distilled {what} in a new --workdir.')
  return params


@dataclasses.dataclass(frozen=True)
class PredictorStudent:
  """A frozen student that gets a semantic gradient predictor (semantic phase) and a latent model (latent phase)."""
  what: str                    # for logs and errors: 'distillation stage 3', 'the consistency model'
  name: str                    # its exports' names: 'stage_3' -> 'stage_3_semantic'
  directory: str               # its phase folder, which holds semantic/ and latent/
  key: int                     # folded into the predictor's and latent model's noise keys: the stage, 0 for CD
  stage: Optional[int]         # its distillation stage; None for the consistency model
  teacher: str                 # the export it was distilled from


def predictor_students(config, run):
  """The students of config that get a predictor: each stage of semantic_stages, then the consistency model when
  config.consistency.semantic (the same target and teacher, SFERD.md §4, on its own sampling levels)."""
  students = [PredictorStudent(what=f'distillation stage {stage}', name=f'stage_{stage}',
                               directory=run.stage_dir(stage), key=stage, stage=stage,
                               teacher=stage_teacher_path(config, run.workdir, stage))
              for stage in config_lib.semantic_stages(config)]
  if config.consistency.semantic:
    students.append(PredictorStudent(what='the consistency model', name='consistency', directory=run.consistency_dir,
                                     key=0, stage=None, teacher=consistency_teacher_path(config, run.workdir)))
  return students


def finished_student(student, what):
  """The export of a PredictorStudent, which `what` needs finished."""
  path = layout.export_of(student.directory)
  if not layout.is_exported(path):
    phase = 'consistency' if student.stage is None else 'distill'
    raise errors.CheckpointError(f'{what} needs the finished {student.what} at {path}; run the {phase} phase first '
                                 f'(it comes before {what} in config.phases).')
  return path


def _once(fn):
  """fn() computed at the first call and kept: what several jobs share but a finished run never needs."""
  return functools.lru_cache(maxsize=None)(fn)


# The teacher: the base diffusion model.


def teacher_spec(config):
  train_config = config.teacher
  tx, schedule, create = _optimizer(train_config)
  model = unet.make_unet(config.model)

  def init(params=None):
    """From the given params, or freshly initialised."""
    if params is None:
      params = unet.init_params(model, jax.random.key(config.seed), model_config=config.model)
    return create(params)

  step = steps_lib.make_teacher_step(model=model, model_config=config.model,
                                     diffusion_config=config.diffusion.to_dict(), train_config=train_config, tx=tx,
                                     schedule=schedule)
  return PhaseSpec(name='teacher', train_config=train_config, step=step, init=init, create=create, seed=config.seed,
                   meta=dict(model=config.model.to_dict(), diffusion=config.diffusion.to_dict(),
                             data=data_record(config), seed=config.seed, loss=train_config.loss,
                             training=training_meta(train_config)))


def teacher_jobs(config, run, spec, mesh):
  del mesh  # the teacher starts from nothing
  yield Job('teacher', run.teacher_dir, lambda: Inputs(
      batches=make_batches(config, spec), rng=jax.random.key(spec.seed),
      info=model_info(config, name='teacher', phase='teacher', num_steps=config.distill.start_num_steps),
      sample_fn=grids.grid_sampler(config, grids.TEACHER_GRID_STEPS)))


# Progressive distillation: start_num_steps -> end_num_steps, halving, one stage per halving.


def distill_spec(config):
  """One step for every stage: the teacher's params and the student's step count are its arguments, so all stages
  share one compilation. Stage k's student starts as its teacher (init(teacher_params)) with a fresh optimizer."""
  train_config = config.distill
  tx, schedule, create = _optimizer(train_config)
  step = steps_lib.make_distill_step(model=unet.make_unet(config.model), model_config=config.model,
                                     diffusion_config=config.diffusion.to_dict(), train_config=train_config, tx=tx,
                                     schedule=schedule,
                                     teacher_fn=guided_teacher.denoise_factory(config.model,
                                                                               config.sferd.attention_guidance))
  return PhaseSpec(name='distill', train_config=train_config, step=step, init=create, create=create,
                   seed=config.seed + 1,
                   meta=distillation_meta(config, train_config))


def distill_jobs(config, run, spec, mesh):
  batches = _once(lambda: make_batches(config, spec))
  num_stages = config_lib.num_stages(config)
  for stage in range(1, num_stages + 1):
    student_steps = config.distill.start_num_steps // 2**stage

    def prepare(stage=stage, student_steps=student_steps):
      teacher = stage_teacher_path(config, run.workdir, stage)
      check_provenance(config, teacher, f'distillation stage {stage}')
      teacher_params = exports.load(teacher, sharding=sharding.replicated(mesh)).params  # enters the steps
      fingerprint = exports.fingerprint(teacher_params)
      # Every stage reads the same examples in the same order; only its noise key differs, folded from the stage
      # number. Resumes rely on both being functions of the step alone.
      return Inputs(batches=batches(), rng=jax.random.fold_in(jax.random.key(spec.seed), stage),
                    meta=dict(student_steps=student_steps, teacher=fingerprint),
                    init_args=(teacher_params,), extra_args=(teacher_params, jnp.int32(student_steps)),
                    sample_fn=grids.grid_sampler(config, student_steps),
                    info=model_info(config, name=f'stage_{stage}', phase='distill', num_steps=student_steps,
                                    stage=stage, teacher=teacher, teacher_fingerprint=fingerprint,
                                    attention_guidance=guidance_meta(config)))

    yield Job(f'distill stage {stage}/{num_stages} ({2 * student_steps} -> {student_steps} steps)',
              run.stage_dir(stage), prepare)


# Consistency distillation of the teacher (or of config.consistency.teacher): one job, consistency/.


def consistency_model_config(config):
  """The consistency model's architecture: config.model with the boundary-condition output (output type
  'consistency_<head>'), so that its parameters are the teacher's and any export of it samples as one."""
  model_config = config.model.to_dict()
  return ml_collections.ConfigDict(dict(model_config, output_type=process.CONSISTENCY + model_config['output_type']))


def _export_in(path, workdir):
  """A config's model path ('teacher', 'distill/stage_3', an export or a phase folder) as an export folder."""
  path = files.absolute(exports.in_workdir(path, workdir))
  return path if layout.is_exported(path) or not layout.is_exported(layout.export_of(path)) \
      else layout.export_of(path)


def consistency_teacher_path(config, workdir):
  """The model whose ODE is distilled: config.consistency.teacher, else the model distill's first stage distils."""
  if config.consistency.teacher:
    return _export_in(config.consistency.teacher, workdir)
  return teacher_path(config, workdir)


def consistency_spec(config):
  """The teacher's params are the step's argument; the student starts from config.consistency.init (the teacher by
  default) with a fresh optimizer and its target network theta- equal to it."""
  train_config = config.consistency
  tx, schedule, create = _optimizer(train_config, state_lib.ConsistencyState)
  step = steps_lib.make_consistency_step(
      model=unet.make_unet(config.model), output_type=consistency_model_config(config).output_type,
      model_config=config.model, diffusion_config=config.diffusion.to_dict(), train_config=train_config, tx=tx,
      schedule=schedule,
      teacher_fn=guided_teacher.denoise_factory(config.model, config.sferd.attention_guidance))
  return PhaseSpec(name='consistency', train_config=train_config, step=step, init=create, create=create,
                   seed=config.seed + 4,
                   meta=distillation_meta(config, train_config))


def consistency_jobs(config, run, spec, mesh):
  num_steps = config.consistency.num_steps

  def prepare():
    replicated = sharding.replicated(mesh)  # the teacher enters the steps
    teacher = check_teacher(config, run.workdir, 'consistency')
    check_provenance(config, teacher, 'consistency distillation')
    teacher_params = exports.load(teacher, sharding=replicated).params
    init = _export_in(config.consistency.init, run.workdir) if config.consistency.init else teacher
    if init != teacher:
      check_architecture(init, config)
      check_provenance(config, init, 'consistency distillation')
    init_params = teacher_params if init == teacher else exports.load(init, sharding=replicated).params
    fingerprints = dict(teacher=exports.fingerprint(teacher_params), init=exports.fingerprint(init_params))
    student_config = consistency_model_config(config)
    info = dict(model_info(config, name='consistency', phase='consistency', num_steps=num_steps, teacher=teacher,
                           teacher_fingerprint=fingerprints['teacher'], init=init,
                           attention_guidance=guidance_meta(config)), model=student_config.to_dict())
    return Inputs(batches=make_batches(config, spec), rng=jax.random.key(spec.seed), meta=fingerprints,
                  init_args=(init_params,), extra_args=(teacher_params,),
                  sample_fn=grids.grid_sampler(config, num_steps, model_config=student_config), info=info)

  yield Job(f'consistency distillation ({num_steps}-step sampler)', run.consistency_dir, prepare)


# The semantic gradient predictor: E_phi and G_tau on each frozen student of predictor_students().


def semantic_spec(config):
  """The target is config.sferd.semantic.target (sferd/semantic_predictor.py), computed with the stage's own
  (guided) teacher where it needs one."""
  train_config = config.semantic
  tx, schedule, create = _optimizer(train_config)
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  step = semantic_step(config, config.model.output_type)

  def init(rng, student_params):
    params = semantic_lib.init_semantic_params(encoder, predictor, rng, model_config=config.model)
    if config.sferd.semantic.init_from_student:
      params = dict(params, predictor=semantic_lib.warm_start_from_student(params['predictor'], student_params))
    return create(params)

  return PhaseSpec(name='semantic', train_config=train_config, step=step, init=init, create=create,
                   seed=config.seed + 2,
                   meta=dict(semantic=semantic_settings(config, training=True), data=data_record(config),
                             seed=config.seed, loss=train_config.loss, attention_guidance=guidance_meta(config),
                             training=training_meta(train_config)))


def semantic_step(config, output_type):
  """The semantic phase's step for a student of `output_type` (a stage's, or a consistency model's)."""
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  tx, schedule, _ = _optimizer(config.semantic)
  return steps_lib.make_semantic_step(
      student=unet.make_unet(config.model), encoder=encoder, predictor=predictor, model_config=config.model,
      output_type=output_type, semantic_config=config.sferd.semantic, diffusion_config=config.diffusion.to_dict(),
      train_config=config.semantic, tx=tx, schedule=schedule,
      teacher_fn=guided_teacher.denoise_factory(config.model, config.sferd.attention_guidance))


def semantic_jobs(config, run, spec, mesh):
  """Exports <student>/semantic/model ({'params': {'encoder', 'predictor'}}) of each predictor_students()."""
  batches = _once(lambda: make_batches(config, spec))
  replicated = sharding.replicated(mesh)  # the student and teacher enter the steps
  for student in predictor_students(config, run):

    def prepare(student=student):
      student_path = finished_student(student, 'the semantic phase')
      check_provenance(config, student_path, f'the semantic predictor of {student.what}')
      model = exports.load(student_path, sharding=replicated)
      teacher_params = load_teacher_of(student.teacher, model, what=student.what, sharding=replicated)
      num_steps = model.config.num_steps
      rng = jax.random.fold_in(jax.random.key(spec.seed), student.key)
      output_type = model.config.model.output_type
      return Inputs(batches=batches(), rng=rng, meta=dict(student=exports.fingerprint(model.params)),
                    init_args=(rng, model.params),
                    extra_args=(model.params, teacher_params, jnp.int32(num_steps)),
                    sample_fn=grids.reconstruction_sampler(config, model, batches().get(0)),
                    step=None if output_type == config.model.output_type else semantic_step(config, output_type),
                    info=dict(name=f'{student.name}_semantic', phase='semantic', stage=student.stage,
                              num_steps=num_steps, semantic=semantic_settings(config), student=student_path,
                              data=data_record(config)))

    yield Job(f'semantic predictor of {student.what}', layout.predictor_dirs(student.directory)[0], prepare)


# The latent diffusion over each semantic stage's normalised codes.


def latent_spec(config):
  """A class-conditional image model (config.model.num_classes > 0) gets a class-conditional latent model, trained
  on each code's image label."""
  train_config = config.latent
  tx, schedule, create = _optimizer(train_config)
  model = latent_lib.make_latent_model(config.sferd.latent, num_classes=int(config.model.num_classes))
  step = steps_lib.make_latent_step(model=model, diffusion_config=config.diffusion.to_dict(),
                                    train_config=train_config, tx=tx, schedule=schedule)
  dim = config.sferd.semantic.latent_dim
  return PhaseSpec(name='latent', train_config=train_config, step=step, create=create, seed=config.seed + 3,
                   init=lambda rng: create(latent_lib.init_latent_params(model, rng, dim=dim)),
                   meta=dict(latent=config.sferd.latent.to_dict(), seed=config.seed, loss=train_config.loss,
                             num_classes=int(config.model.num_classes), training=training_meta(train_config),
                             data=data_record(config)))


def latent_jobs(config, run, spec, mesh):
  """Exports <student>/latent/model of each predictor_students(): its params and the code statistics ({'params',
  'stats': {'mean', 'std'}}); model.json records its num_classes."""
  del mesh  # its data are codes computed here, on this process
  encoder, _ = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  num_classes = int(config.model.num_classes)
  for student in predictor_students(config, run):

    def prepare(student=student):
      semantic_path = layout.predictor_exports(student.directory)[0]
      if not layout.is_exported(semantic_path):
        raise errors.CheckpointError(f'the latent phase needs the semantic predictor of {student.what} at '
                                     f'{semantic_path}; run the semantic phase first.')
      check_provenance(config, semantic_path, f'the latent model of {student.what}')
      semantic_params = exports.load_semantic_params(semantic_path, config.model, config.sferd.semantic)
      source = data_lib.load_source(data_lib.data_config(config))
      encode = jax.jit(lambda params, x: encoder.apply({'params': params}, x))
      codes, labels = codes_lib.encode_dataset(source, functools.partial(encode, semantic_params['encoder']))
      if num_classes and not 0 <= labels.min() <= labels.max() < num_classes:
        # nn.Embed would silently clamp (or NaN) an out-of-range label: fail before any training.
        raise errors.DataError(f'the dataset\'s labels span [{labels.min()}, {labels.max()}], outside the model\'s '
                               f'{num_classes} classes (config.model.num_classes)')
      stats = latent_lib.latent_statistics(codes)  # over all codes, whatever their class
      rng = jax.random.fold_in(jax.random.key(spec.seed), student.key)
      model = exports.load(finished_student(student, 'the latent phase'))
      return Inputs(
          batches=codes_lib.CodeBatches(np.asarray(latent_lib.normalize(codes, stats)), labels=labels,
                                        global_batch_size=spec.train_config.batch_size, seed=spec.seed),
          rng=rng, init_args=(rng,), meta=dict(encoder=exports.fingerprint(semantic_params['encoder'])),
          sample_fn=grids.semantic_sampler(config, model, semantic_params, stats),
          extra_trees={'stats': {'mean': np.asarray(stats.mean), 'std': np.asarray(stats.std)}},  # NumPy: written
          info=dict(name=f'{student.name}_latent', phase='latent', stage=student.stage,  # once, not per process
                    latent=config.sferd.latent.to_dict(), latent_dim=config.sferd.semantic.latent_dim,
                    num_classes=num_classes, num_codes=len(codes), data=data_record(config)))

    yield Job(f'latent model of {student.what}', layout.predictor_dirs(student.directory)[1], prepare)


# name -> (spec builder, jobs). The order of config.PHASES is the order they run in; 'evaluate' is not trained.
PHASES = {
    'teacher': (teacher_spec, teacher_jobs),
    'distill': (distill_spec, distill_jobs),
    'consistency': (consistency_spec, consistency_jobs),
    'semantic': (semantic_spec, semantic_jobs),
    'latent': (latent_spec, latent_jobs),
}
