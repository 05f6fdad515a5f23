"""The phases of a run, in order: teacher -> distillation stages -> ... Each phase resumes or skips when done.

Layout of a run folder (--workdir):
  teacher/                   checkpoints/, samples/, metrics.jsonl, summary.json, model/ (the exported teacher)
  distill/stage_<k>/         the same, per distillation stage; model/ is the stage's student, stage k+1's teacher
  distill/stage_<k>/semantic/  E_phi and G_tau trained on that stage's frozen student (model/ is their export)
  distill/stage_<k>/latent/    the latent diffusion over E_phi's codes (model/: its params and the code statistics)
  distill/stages.{json,md}   the stage table: student steps, final loss, wall time, images/s
  samples/                   the teacher's and each student's samples side by side
"""

import json
import os

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
from absl import logging

from sferd_jax import errors
from sferd_jax import config as config_lib
from sferd_jax import data as data_lib
from sferd_jax import images as images_lib
from sferd_jax import sampling
from sferd_jax.diffusion import samplers
from sferd_jax.diffusion import schedules
from sferd_jax.evaluation import evaluate
from sferd_jax.models import denoiser
from sferd_jax.models import latent as latent_lib
from sferd_jax.models import semantic as semantic_lib
from sferd_jax.models import unet
from sferd_jax.sferd import guided_teacher
from sferd_jax.sferd import semantic_predictor
from sferd_jax.training import checkpointing
from sferd_jax.training import loop
from sferd_jax.training import sharding
from sferd_jax.training import state as state_lib
from sferd_jax.training import steps as steps_lib

GRID_SAMPLES = 64
TEACHER_GRID_STEPS = 128  # teacher grids show the base model well sampled, at a fixed cost per grid
TRAINED_PHASES = ('teacher', 'distill', 'semantic', 'latent')  # the phases with a training section of that name
# Training keys that do not change what a phase computes: a resume may change them. (steps_per_call only groups
# the same steps into calls; distill's stage keys are covered by student_steps and the teacher fingerprint.)
RESUMABLE_KEYS = ('log_every', 'checkpoint_every', 'keep_checkpoints', 'sample_every', 'steps_per_call', 'teacher',
                  'start_num_steps', 'end_num_steps')


def make_batches(config, train_config, *, seed_offset=0):
  source = data_lib.load_source(data_lib.data_config(config))
  logging.info('data: %s', source)
  return data_lib.Batches(source, global_batch_size=train_config.batch_size, seed=config.seed + seed_offset,
                          random_flip=config.data.random_flip)


def grid_sampler(config, num_steps):
  """params -> uint8 grid samples, with a fixed key so grids of successive steps are comparable."""
  def sample_fn(params):
    return sampling.sample(params, jax.random.key(config.seed), model_config=config.model,
                           num_samples=GRID_SAMPLES, num_steps=num_steps, diffusion_config=config.diffusion.to_dict())
  return sample_fn


def check_batch_sizes(config, sections, mesh):
  """Each section's global batch splits over the mesh's devices: a ConfigError before any work, not in a phase."""
  for section in sections:
    sharding.check_batch_size(config[section].batch_size, mesh, what=f'config.{section}.batch_size')


def training_meta(train_config):
  """What a phase's checkpoints record of its training section, for a resume to match (Phase.meta)."""
  return {k: v for k, v in config_lib.to_json(train_config).items() if k not in RESUMABLE_KEYS}


def guidance_meta(config):
  """The attention-guidance settings a distillation target used: None when guidance is off (then none matter)."""
  cfg = config.sferd.attention_guidance
  return config_lib.to_json(cfg) if guided_teacher.is_active(cfg) else None


def model_info(config, *, name, phase, num_steps, **extra):
  """model.json of an export: what load() and the next stage need to know."""
  return dict(name=name, phase=phase, num_steps=num_steps, model=config.model.to_dict(),
              diffusion=config.diffusion.to_dict(), **extra)


# Model keys that change how a model runs but not its parameters: a teacher trained with dropout 0.2 is
# distilled with dropout 0 (as in progressive distillation), and a float32 export may run in bfloat16.
NOT_ARCHITECTURE = ('dropout', 'dtype')


def check_architecture(export_path, config):
  """An exported model must have the architecture of config.model and the noise schedule of config.diffusion, or
  nothing downstream can use it (a student distilled on another schedule would not match its teacher)."""
  info = checkpointing.read_info(export_path)
  diff = {}
  for section in ('model', 'diffusion'):
    saved, wanted = info.get(section), config_lib.to_json(config[section])
    if saved is None:  # an export older than the section's record: nothing to compare
      continue
    diff.update({f'{section}.{k}': (saved.get(k), v) for k, v in wanted.items()
                 if saved.get(k) != v and k not in NOT_ARCHITECTURE})
  if diff:
    raise errors.IncompatibleRunError(
        f'{export_path} holds a model whose architecture differs from the config (config key: (saved, config)): '
        f'{diff}. Use a new --workdir, or set these config keys to the saved values.')


def init_fn(config, train_config, tx):
  """init(params=None) -> TrainState, from the given params (a teacher's) or freshly initialised.

  Phases pass a teacher's params as an argument of the jitted init (Phase.init_args): closed over, they would be
  compile-time constants, 60M of them for CIFAR-10, baked into every stage's init.
  """
  model = unet.make_unet(config.model)

  def init(params=None):
    if params is None:
      params = unet.init_params(model, jax.random.key(config.seed), model_config=config.model)
    return state_lib.TrainState.create(params=params, tx=tx, ema_decay=train_config.ema_decay)

  return init


def run_teacher(config, workdir, *, mesh=None):
  """Trains (or resumes) the base model and exports it to <workdir>/teacher/model. Returns the export path."""
  directory = os.path.join(workdir, 'teacher')
  export_path = os.path.join(directory, 'model')
  if checkpointing.is_exported(export_path):
    check_architecture(export_path, config)
    logging.info('teacher: finished and exported at %s; skipping', export_path)
    return export_path
  mesh = mesh or sharding.make_mesh()
  check_batch_sizes(config, ('teacher',), mesh)
  train_config = config.teacher
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, train_config.train_steps)
  model = unet.make_unet(config.model)
  phase = loop.Phase(
      name='teacher', directory=directory, train_config=train_config,
      step=steps_lib.make_teacher_step(model=model, model_config=config.model,
                                       diffusion_config=config.diffusion.to_dict(), train_config=train_config,
                                       tx=tx, schedule=schedule),
      init_state=init_fn(config, train_config, tx),
      meta=dict(model=config.model.to_dict(), diffusion=config.diffusion.to_dict(), data=data_lib.data_config(config),
                seed=config.seed, loss=train_config.loss),
      sample_fn=grid_sampler(config, TEACHER_GRID_STEPS))
  state, summary = loop.run_phase(phase, batches=make_batches(config, train_config), mesh=mesh,
                                  rng=jax.random.key(config.seed))
  checkpointing.export_model(export_path, trees={'params': state.export_params},
                             info=model_info(config, name='teacher', phase='teacher',
                                             num_steps=config.distill.start_num_steps, summary=summary))
  logging.info('teacher: exported to %s', export_path)
  return export_path


def teacher_path(config, workdir):
  """The model stage 1 distils: config.distill.teacher, or the teacher phase's export in the workdir."""
  return os.path.abspath(config.distill.teacher or os.path.join(workdir, 'teacher', 'model'))


def stage_dir(workdir, stage):
  return os.path.join(workdir, 'distill', f'stage_{stage}')


def stage_teacher_path(config, workdir, stage):
  """The model stage `stage` distils: stage k-1's export, or for stage 1 teacher_path(). Derived, not read from
  model.json (which records absolute paths), so a moved workdir still works."""
  return teacher_path(config, workdir) if stage == 1 else os.path.join(stage_dir(workdir, stage - 1), 'model')


def check_teacher(config, workdir):
  """Fails before any work when the teacher to distil is missing or has another architecture."""
  path = teacher_path(config, workdir)
  if not checkpointing.is_exported(path):
    raise errors.CheckpointError(
        f'no teacher to distil at {path}. Train one first (--mode=train_teacher, or put "teacher" in '
        f'config.phases), or point config.distill.teacher at an exported model folder.')
  check_architecture(path, config)
  return path


def run_distill(config, workdir, *, mesh=None):
  """Progressive distillation, start_num_steps -> end_num_steps, halving; resumes the unfinished stage.

  Stage k trains a student of start / 2^k steps, initialised from its teacher (stage k-1's student) with a fresh
  optimizer, and exports it to distill/stage_<k>/model. All stages share one compiled step.
  """
  teacher = check_teacher(config, workdir)
  mesh = mesh or sharding.make_mesh()
  check_batch_sizes(config, ('distill',), mesh)
  train_config = config.distill
  num_stages = config_lib.num_stages(config)
  model = unet.make_unet(config.model)
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, train_config.train_steps)
  step = steps_lib.make_distill_step(model=model, model_config=config.model,
                                     diffusion_config=config.diffusion.to_dict(), train_config=train_config, tx=tx,
                                     schedule=schedule,
                                     teacher_fn=guided_teacher.denoise_factory(config.model,
                                                                               config.sferd.attention_guidance))
  batches = make_batches(config, train_config, seed_offset=1)
  init = init_fn(config, train_config, tx)  # one function for all stages: its jitted form is traced once
  rows = []
  for stage in range(1, num_stages + 1):
    student_steps = config.distill.start_num_steps // 2**stage
    directory = stage_dir(workdir, stage)
    export_path = os.path.join(directory, 'model')
    if checkpointing.is_exported(export_path):
      check_architecture(export_path, config)
      info = checkpointing.read_info(export_path)
      logging.info('distill stage %d: finished and exported at %s; skipping', stage, export_path)
    else:
      teacher_params = sampling.load(teacher, sharding=sharding.replicated(mesh)).params  # enters the steps
      name = f'distill stage {stage}/{num_stages} ({2 * student_steps} -> {student_steps} steps)'
      phase = loop.Phase(
          name=name, directory=directory, train_config=train_config, step=step, init_state=init,
          init_args=(teacher_params,),
          extra_args=(teacher_params, jnp.int32(student_steps)),
          meta=dict(model=config.model.to_dict(), diffusion=config.diffusion.to_dict(),
                    data=data_lib.data_config(config), seed=config.seed, loss=train_config.loss,
                    student_steps=student_steps, teacher=checkpointing.fingerprint(teacher_params),
                    attention_guidance=guidance_meta(config), training=training_meta(train_config)),
          sample_fn=grid_sampler(config, student_steps))
      # Every stage reads the same examples in the same order (one Batches, one data seed); only its noise key
      # differs, folded from the stage number. Resumes rely on both being functions of the step alone.
      state, summary = loop.run_phase(phase, batches=batches, mesh=mesh,
                                      rng=jax.random.fold_in(jax.random.key(config.seed + 1), stage))
      info = model_info(config, name=f'stage_{stage}', phase='distill', num_steps=student_steps, stage=stage,
                        teacher=teacher, teacher_fingerprint=phase.meta['teacher'], summary=summary)
      checkpointing.export_model(export_path, trees={'params': state.export_params}, info=info)
      logging.info('%s: exported to %s', name, export_path)
    rows.append(dict(stage=stage, teacher_steps=2 * student_steps, student_steps=student_steps,
                     **{k: info['summary'][k] for k in ('final_loss', 'wall_s', 'images_per_s', 'compile_s')}))
    teacher = export_path
  write_stage_table(os.path.join(workdir, 'distill'), rows)
  return teacher


def write_stage_table(directory, rows):
  """distill/stages.json and stages.md: one row per stage."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(directory, 'stages.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  lines = ['| stage | steps (teacher -> student) | final loss | wall time | images/s | compile s |',
           '|---|---|---|---|---|---|']
  lines += [f"| {r['stage']} | {r['teacher_steps']} -> {r['student_steps']} | {r['final_loss']:.5f} | "
            f"{r['wall_s']:.0f} s | {r['images_per_s']:.1f} | {r['compile_s']:.1f} |" for r in rows]
  with open(os.path.join(directory, 'stages.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def write_comparison(config, workdir, *, student_steps=(4, 2, 1), num_samples=8):
  """samples/comparison.png: the teacher (top row) and the students of `student_steps` from the same noise.

  Every process loads the models (Orbax's restore synchronises them); process 0 samples and writes.
  """
  rows, names = [], []
  candidates = [('teacher', os.path.join(workdir, 'teacher', 'model'))]
  for stage in range(1, config_lib.num_stages(config) + 1):
    if config.distill.start_num_steps // 2**stage in student_steps:
      candidates.append((f'stage_{stage}', os.path.join(stage_dir(workdir, stage), 'model')))
  models = [(name, sampling.load(path)) for name, path in candidates if checkpointing.is_exported(path)]
  if jax.process_index() != 0:
    return
  for name, model in models:
    rows.append(model.sample(jax.random.key(config.seed), num_samples=num_samples))
    names.append(f'{name} ({model.config.num_steps} steps)')
  if rows:
    path = os.path.join(workdir, 'samples', 'comparison.png')
    images_lib.save_grid(path, np.concatenate(rows), columns=num_samples)
    with open(os.path.join(workdir, 'samples', 'comparison.txt'), 'w') as f:
      f.write('rows, top to bottom:\n' + '\n'.join(names) + '\n')
    logging.info('wrote %s: rows %s', path, ', '.join(names))


def _finished_stage(workdir, stage, what):
  path = os.path.join(stage_dir(workdir, stage), 'model')
  if not checkpointing.is_exported(path):
    raise errors.CheckpointError(f'{what} needs the finished distillation stage {stage} at {path}; run the '
                                 f'distill phase first (it comes before {what} in config.phases).')
  return path


def run_semantic(config, workdir, *, mesh=None):
  """Trains E_phi and G_tau on the frozen student of each stage of config_lib.semantic_stages.

  The target is config.sferd.semantic.target (sferd/semantic_predictor.py), computed with the stage's own (guided)
  teacher where it needs one. Exports distill/stage_<k>/semantic/model ({'params': {'encoder', 'predictor'}}).
  """
  mesh = mesh or sharding.make_mesh()
  check_batch_sizes(config, ('semantic',), mesh)
  train_config = config.semantic
  student_model = unet.make_unet(config.model)
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, train_config.train_steps)
  step = steps_lib.make_semantic_step(
      student=student_model, encoder=encoder, predictor=predictor, model_config=config.model,
      semantic_config=config.sferd.semantic, diffusion_config=config.diffusion.to_dict(), train_config=train_config,
      tx=tx, schedule=schedule,
      teacher_fn=guided_teacher.denoise_factory(config.model, config.sferd.attention_guidance))
  batches = make_batches(config, train_config, seed_offset=2)
  replicated = sharding.replicated(mesh)  # the student and teacher enter the steps

  def init(rng, student_params):
    params = semantic_lib.init_semantic_params(encoder, predictor, rng, model_config=config.model)
    if config.sferd.semantic.init_from_student:
      params = dict(params, predictor=semantic_lib.warm_start_from_student(params['predictor'], student_params))
    return state_lib.TrainState.create(params=params, tx=tx, ema_decay=train_config.ema_decay)

  for stage in config_lib.semantic_stages(config):
    student_path = _finished_stage(workdir, stage, 'the semantic phase')
    directory = os.path.join(stage_dir(workdir, stage), 'semantic')
    export_path = os.path.join(directory, 'model')
    if checkpointing.is_exported(export_path):
      logging.info('semantic stage %d: finished and exported at %s; skipping', stage, export_path)
      continue
    student = sampling.load(student_path, sharding=replicated)
    teacher_params = load_stage_teacher(config, workdir, stage, student, sharding=replicated)
    num_steps = student.config.num_steps
    rng = jax.random.fold_in(jax.random.key(config.seed + 2), stage)
    phase = loop.Phase(
        name=f'semantic stage {stage} ({num_steps}-step student)', directory=directory, train_config=train_config,
        step=step, init_state=init, init_args=(rng, student.params),
        extra_args=(student.params, teacher_params, jnp.int32(num_steps)),
        meta=dict(semantic=semantic_settings(config, training=True), data=data_lib.data_config(config),
                  seed=config.seed,
                  loss=train_config.loss, student=checkpointing.fingerprint(student.params),
                  attention_guidance=guidance_meta(config), training=training_meta(train_config)),
        sample_fn=reconstruction_sampler(config, student, batches.get(0)))
    state, summary = loop.run_phase(phase, batches=batches, mesh=mesh, rng=rng)
    checkpointing.export_model(export_path, trees={'params': state.export_params}, info=dict(
        name=f'stage_{stage}_semantic', phase='semantic', stage=stage, num_steps=num_steps,
        semantic=semantic_settings(config), student=student_path, summary=summary))
    logging.info('semantic stage %d: exported to %s', stage, export_path)


def semantic_settings(config, *, training=False):
  """config.sferd.semantic as a stage's predictor records it: without `stages` (which stages get one changes none
  of them) and, in a phase's resume record (training=True), without the sampling-only `stop_fraction`."""
  skip = ('stages', 'stop_fraction') if training else ('stages',)
  return {k: v for k, v in config.sferd.semantic.to_dict().items() if k not in skip}


def load_stage_teacher(config, workdir, stage, student, *, sharding=None):
  """The params of the model stage `stage`'s student was distilled from, checked against its recorded fingerprint."""
  path = stage_teacher_path(config, workdir, stage)
  if not checkpointing.is_exported(path):
    raise errors.CheckpointError(f'the teacher of distillation stage {stage} is missing at {path}; it is '
                                 f'needed to train that stage\'s semantic predictor. Restore it, or rerun '
                                 f'the distill phase.')
  params = sampling.load(path, sharding=sharding).params
  expected, found = student.config.get('teacher_fingerprint'), checkpointing.fingerprint(params)
  if expected and found != expected:
    raise errors.CheckpointError(
        f'{path} is not the model stage {stage} was distilled from (fingerprint {found}, expected {expected}). '
        f'Restore that model there, or rerun the distill phase in a new --workdir.')
  return params


def reconstruction_sampler(config, student, batch, *, num_images=8):
  """Semantic-phase grids: real images (top row) and the shifted student's samples from z_sem = E_phi(them).

  The student starts from noise; only the code carries the image, so resemblance shows what G_tau has learnt.
  """
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  gradient_param = semantic_predictor.setting(config.sferd.semantic, 'gradient_param')
  x0, labels = batch['image'][0, :num_images], batch['label'][0, :num_images]
  labels = denoiser.labels_or_none(config.model, labels)
  z = jax.random.normal(jax.random.key(config.seed), x0.shape)
  diffusion_config = config.diffusion.to_dict()
  student_params = sharding.host_local(student.params)  # grids run on one process's devices

  @jax.jit
  def run(semantic_params, student_params):
    z_sem = encoder.apply({'params': semantic_params['encoder']}, x0)
    denoise = semantic_predictor.shifted_denoise_fn(
        student=unet.make_unet(config.model), student_params=student_params, output_type=config.model.output_type,
        predictor=predictor, predictor_params=semantic_params['predictor'], z_sem=z_sem,
        gradient_param=gradient_param, labels=labels, num_steps=student.config.num_steps,
        stop_fraction=semantic_predictor.setting(config.sferd.semantic, 'stop_fraction'),
        logsnr_fn=lambda t: schedules.cosine_logsnr(t, **diffusion_config))
    return samplers.sample_loop(denoise_fn=denoise, z_init=z, num_steps=student.config.num_steps,
                                rng=jax.random.key(config.seed), **diffusion_config)

  return lambda params: np.concatenate([images_lib.to_uint8(x0), images_lib.to_uint8(run(params, student_params))])


def semantic_sampler(config, student, semantic_params, stats):
  """Latent-phase grids: the student with its predictor and codes drawn from the latent model being trained."""
  def sample_fn(latent_params):
    predictor = sampling.SemanticPredictor(
        params=semantic_params, latent_params=latent_params, stats={'mean': stats.mean, 'std': stats.std},
        config=ml_collections.ConfigDict({'semantic': config.sferd.semantic.to_dict(),
                                          'latent': config.sferd.latent.to_dict(),
                                          'latent_num_classes': int(config.model.num_classes)}))
    return sampling.sample(student.params, jax.random.key(config.seed), model_config=config.model,
                           num_samples=GRID_SAMPLES, num_steps=student.config.num_steps,
                           diffusion_config=config.diffusion.to_dict(), semantic=predictor)
  return sample_fn


class CodeBatches(data_lib.Batches):
  """Batches of semantic codes (N, latent_dim) in 'image' and their images' labels (N,) in 'label' (zeros when
  labels=None), with Batches' resumable per-process order."""

  def __init__(self, codes, *, global_batch_size, seed, labels=None):
    super().__init__(data_lib.ArraySource(np.zeros((len(codes), 1, 1, 1), np.uint8)),
                     global_batch_size=global_batch_size, seed=seed)
    self.codes = np.asarray(codes, np.float32)
    self.labels = np.zeros(len(codes), np.int32) if labels is None else np.asarray(labels, np.int32)
    if self.labels.shape != (len(self.codes),):
      raise ValueError(f'CodeBatches: labels must have shape ({len(self.codes)},), got {self.labels.shape}')

  def get(self, step, num_steps=1):
    index, _ = self.indices(step, num_steps)
    return {'image': self.codes[index], 'label': self.labels[index]}


def encode_dataset(config, encoder, encoder_params, *, batch_size=256):
  """E_phi of every training image and its label: ((N, latent_dim) float32, (N,) int32).

  Reads the images a batch at a time (ImageNet-64 would be 16 GB at once); the last batch is padded to the same
  shape, so one compilation serves all.
  """
  source = data_lib.load_source(data_lib.data_config(config))
  encode = jax.jit(lambda p, x: encoder.apply({'params': p}, x))
  codes, labels = [], []
  for start in range(0, len(source), batch_size):
    indices = np.arange(start, min(start + batch_size, len(source)))
    images, batch_labels = source.read(np.pad(indices, (0, batch_size - len(indices)), mode='edge'),
                                       num_threads=16)
    codes.append(jax.device_get(encode(encoder_params, images_lib.from_uint8(images)))[:len(indices)])
    labels.append(np.asarray(batch_labels, np.int32)[:len(indices)])
  return np.concatenate(codes), np.concatenate(labels)


def run_latent(config, workdir, *, mesh=None):
  """Trains the latent diffusion over each semantic stage's normalised codes: distill/stage_<k>/latent/model
  holds its params and the code statistics ({'params', 'stats': {'mean', 'std'}}).

  A class-conditional image model (config.model.num_classes > 0) gets a class-conditional latent model, trained
  on each code's image label; model.json records its num_classes.
  """
  mesh = mesh or sharding.make_mesh()
  check_batch_sizes(config, ('latent',), mesh)
  train_config = config.latent
  encoder, _ = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  num_classes = int(config.model.num_classes)
  model = latent_lib.make_latent_model(config.sferd.latent, num_classes=num_classes)
  dim = config.sferd.semantic.latent_dim
  tx, schedule = state_lib.make_optimizer(train_config.optimizer, train_config.train_steps)
  step = steps_lib.make_latent_step(model=model, diffusion_config=config.diffusion.to_dict(),
                                    train_config=train_config, tx=tx, schedule=schedule)
  for stage in config_lib.semantic_stages(config):
    semantic_path = os.path.join(stage_dir(workdir, stage), 'semantic', 'model')
    if not checkpointing.is_exported(semantic_path):
      raise errors.CheckpointError(f'the latent phase needs the semantic predictor of stage {stage} at '
                                   f'{semantic_path}; run the semantic phase first.')
    directory = os.path.join(stage_dir(workdir, stage), 'latent')
    export_path = os.path.join(directory, 'model')
    if checkpointing.is_exported(export_path):
      logging.info('latent stage %d: finished and exported at %s; skipping', stage, export_path)
      continue
    semantic_params = sampling.load_semantic_params(semantic_path, config.model, config.sferd.semantic)
    codes, labels = encode_dataset(config, encoder, semantic_params['encoder'])
    if num_classes and not 0 <= labels.min() <= labels.max() < num_classes:
      # nn.Embed would silently clamp (or NaN) an out-of-range label: fail before any training.
      raise ValueError(f'the dataset\'s labels span [{labels.min()}, {labels.max()}], outside the model\'s '
                       f'{num_classes} classes (config.model.num_classes)')
    stats = latent_lib.latent_statistics(codes)  # over all codes, whatever their class
    rng = jax.random.fold_in(jax.random.key(config.seed + 3), stage)
    phase = loop.Phase(
        name=f'latent stage {stage}', directory=directory, train_config=train_config, step=step,
        init_state=lambda rng=rng: state_lib.TrainState.create(
            params=latent_lib.init_latent_params(model, rng, dim=dim), tx=tx, ema_decay=train_config.ema_decay),
        meta=dict(latent=config.sferd.latent.to_dict(), seed=config.seed, loss=train_config.loss,
                  encoder=checkpointing.fingerprint(semantic_params['encoder']), num_classes=num_classes),
        sample_fn=semantic_sampler(config, sampling.load(_finished_stage(workdir, stage, 'the latent phase')),
                                   semantic_params, stats))
    batches = CodeBatches(np.asarray(latent_lib.normalize(codes, stats)), global_batch_size=train_config.batch_size,
                          seed=config.seed + 3, labels=labels)
    state, summary = loop.run_phase(phase, batches=batches, mesh=mesh, rng=rng)
    checkpointing.export_model(
        export_path, trees={'params': state.export_params,  # stats as NumPy: written once, not per process
                            'stats': {'mean': np.asarray(stats.mean), 'std': np.asarray(stats.std)}},
        info=dict(name=f'stage_{stage}_latent', phase='latent', stage=stage, latent=config.sferd.latent.to_dict(),
                  latent_dim=dim, num_classes=num_classes, num_codes=len(codes), summary=summary))
    logging.info('latent stage %d: exported to %s', stage, export_path)


def run_pipeline(config, workdir):
  """Runs every phase in config.phases, in order, skipping finished ones."""
  mesh = sharding.make_mesh()
  check_batch_sizes(config, [p for p in config.phases if p in TRAINED_PHASES], mesh)
  if 'distill' in config.phases and 'teacher' not in config.phases:
    check_teacher(config, workdir)  # fail before any work, not after the phases before it
  runners = {'teacher': run_teacher, 'distill': run_distill, 'semantic': run_semantic, 'latent': run_latent,
             'evaluate': evaluate.run_evaluate}
  for phase in config.phases:  # validate() has checked that each is one of config.PHASES
    runners[phase](config, workdir, mesh=mesh)
    if phase == 'distill':
      write_comparison(config, workdir)
