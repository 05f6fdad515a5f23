"""The configuration schema: every config in configs/ starts from `base_config()` and is checked by `validate()`.

One schema for every config means one place that says what each key does, and that an unknown key (a typo
on the command line, say) fails at once: the returned ConfigDicts are locked.
"""

import json
import math

import ml_collections

from sferd_jax import errors

PHASES = ('teacher', 'distill', 'consistency', 'semantic', 'latent', 'evaluate')
OPTIMIZERS = ('adam', 'adamw')
LR_SCHEDULES = ('constant', 'linear_decay')


# Progressive distillation's U-Nets (google-research diffusion_distillation config/*_base.py): 60.0M and 295.9M
# parameters. Their base models train with dropout; their distillation runs with dropout 0.
CIFAR10_UNET = dict(image_size=32, channels=3, ch=256, emb_ch=1024, ch_mult=(1, 1, 1), num_res_blocks=3,
                    attn_resolutions=(8, 16), num_heads=1, head_dim=None, dropout=0.2, resblock_resample=True,
                    num_classes=0, output_type='x', dtype='float32')
IMAGENET64_UNET = dict(image_size=64, channels=3, ch=192, emb_ch=768, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                       attn_resolutions=(8, 16, 32), num_heads=None, head_dim=64, dropout=0.1,
                       resblock_resample=True, num_classes=1000, output_type='both', dtype='float32')


def _optional(field_type, default=None):
  """A key that may be None yet stays settable from the command line (--config.<key>=...): ml_collections
  refuses to override a plain None, since it cannot tell the type."""
  return ml_collections.FieldReference(default, field_type=field_type)


def training_config(*, train_steps, batch_size, learning_rate, warmup_steps=0, schedule='constant', weight_decay=0.0,
                    grad_clip=1.0, ema_decay=0.0, loss='snr_trunc', log_every=100, checkpoint_every=1000,
                    keep_checkpoints=2, sample_every=0, steps_per_call=1):
  """The settings every training phase shares: the loop, the optimizer and the loss."""
  return ml_collections.ConfigDict(dict(
      train_steps=train_steps,          # optimizer updates (per stage, for distillation)
      batch_size=batch_size,            # global batch, split over all devices and hosts
      loss=loss,                        # snr_trunc | v_mse | eps_mse
      optimizer=dict(
          name='adam' if weight_decay == 0.0 else 'adamw',
          learning_rate=learning_rate,
          warmup_steps=warmup_steps,    # linear warm-up from 0
          schedule=schedule,            # constant | linear_decay (to 0 at train_steps)
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=weight_decay,    # decoupled (AdamW); requires name='adamw' when > 0
          grad_clip=grad_clip,          # global-norm clipping; 0 disables
      ),
      ema_decay=ema_decay,              # 0 = no EMA (the exported model is then the raw parameters)
      steps_per_call=steps_per_call,    # optimizer steps per host call, through lax.scan
      log_every=log_every,              # steps between log lines (rounded up to steps_per_call)
      checkpoint_every=checkpoint_every,  # steps between checkpoints
      keep_checkpoints=keep_checkpoints,  # how many recent checkpoints to keep
      sample_every=sample_every,        # steps between sample grids; 0 = only at the end
  ))


def distill_config(*, start_num_steps, end_num_steps, schedule='linear_decay', **training):
  """The distillation section: training_config's keys (train_steps per stage) plus the stages and the teacher."""
  config = training_config(schedule=schedule, **training)
  config.teacher = _optional(str)           # exported model to distil; None = the teacher phase's export
  config.start_num_steps = start_num_steps  # sampling steps of the first teacher; halved every stage
  config.end_num_steps = end_num_steps      # sampling steps of the last student
  return config


def consistency_config(*, num_steps=1, solver='ddim', num_scales=18, target_decay=0.0, loss='pseudo_huber',
                       **training):
  """The consistency-distillation section (diffusion/consistency.py): training_config's keys plus CD's own."""
  config = training_config(loss=loss, **training)   # loss: the distance d, pseudo_huber | l2
  config.teacher = _optional(str)         # exported model whose ODE is distilled; None = distill's first teacher
  config.init = _optional(str)            # exported model the student starts from (the teacher, a PD stage: a path
                                          # in the workdir like 'distill/stage_3'); None = the teacher
  config.num_steps = num_steps            # sampling steps its export records (sample and evaluate use them)
  config.solver = solver                  # the teacher's ODE step: ddim | heun (two teacher calls)
  config.num_scales_start = num_scales    # N(k): ODE grid intervals at the first step ...
  config.num_scales_end = num_scales      # ... and at the last (the consistency models' schedule; equal: fixed)
  config.target_decay = target_decay      # mu of the target network theta- (0: theta- = theta, their CD's)
  config.semantic = False                 # SFERD on CD: the semantic and latent phases also train a predictor and
                                          # its latent model on the consistency model (consistency/semantic, /latent)
  return config


def base_config():
  """Defaults shared by all configs; a config file overrides what it needs and returns `lock(config)`."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # What `--mode=pipeline` runs, in order.
  config.phases = ('teacher',)
  # Config keys (or prefixes, e.g. 'distill.optimizer') a resume or a later phase may find changed: each change is
  # recorded at the step it applies from. E.g. ('distill.optimizer.learning_rate',) to continue a diverged stage.
  config.allow_changes = ()
  # Steps of every trained phase traced with jax.profiler after its first (compiling) call, into
  # <phase>/tensorboard/plugins/profile for TensorBoard's profile tab; 0: none.
  config.profile_steps = 0

  config.data = dict(
      name='digits',          # digits | fashion_mnist | cifar10 | imagenet64 | npz
      split='train',
      data_dir=_optional(str),  # None = the source's default location (TFDS: $TFDS_DATA_DIR or ~/tensorflow_datasets)
      path=_optional(str),    # the .npz file, for name='npz'
      random_flip=False,
  )
  # The denoiser's architecture; image_size and channels also fix the data's shape.
  config.model = dict(
      image_size=16,
      channels=1,
      ch=32,
      emb_ch=128,
      ch_mult=(1, 2, 2),
      num_res_blocks=2,
      attn_resolutions=(8, 4),
      num_heads=_optional(int, 1),  # exactly one of num_heads and head_dim is set
      head_dim=_optional(int),
      dropout=0.0,
      resblock_resample=False,
      num_classes=0,          # 0 = unconditional
      output_type='x',        # x | eps | v | both
      dtype='float32',        # compute dtype; parameters and optimizer state are always float32
  )
  config.diffusion = dict(logsnr_min=-20.0, logsnr_max=20.0)  # cosine log-SNR schedule

  config.teacher = training_config(train_steps=1000, batch_size=64, learning_rate=2e-4)
  config.distill = distill_config(train_steps=1000, batch_size=64, learning_rate=5e-5, start_num_steps=256,
                                  end_num_steps=1)

  config.consistency = consistency_config(train_steps=1000, batch_size=64, learning_rate=1e-4)

  # SFERD's mechanisms (SFERD.md §3, §4); their defaults are explained in the README.
  config.sferd = ml_collections.ConfigDict()
  config.sferd.attention_guidance = dict(
      enabled=False,          # guide every teacher evaluation of the distillation target
      block=_optional(str),   # attention block name (see models.unet.attention_blocks); None = the decoder's
                              # highest-resolution one, as the official code does
      threshold=1.0,          # a key is risky if it draws more than this attention mass (1.0 = the average)
      kernel_size=15,         # Gaussian blur of the risky regions (the official code: 15, sigma 3)
      sigma=3.0,
      weight=0.3,             # eps_guided = eps + w (eps - eps_blurred); the official code's scale 1.3 = 1 + w
      padding='reflect',      # blur padding: reflect (torchvision's, the official code) | symmetric
      logsnr_min=_optional(float),  # guide only where logsnr_min <= log-SNR <= logsnr_max; None = unbounded
      logsnr_max=_optional(float),
  )

  config.sferd.semantic = dict(   # the semantic encoder E_phi and gradient predictor G_tau (SFERD.md §4)
      stages=_optional(tuple),  # distillation stages that get a predictor; negative counts from the end (-1 = last);
                              # None = the last three (the 4-, 2-, 1-step students of a run ending at 1 step), or
                              # every stage of shorter runs
      target='teacher_on_data',  # what the shifted student regresses (it must depend on x0 beyond z_t):
                              # teacher_on_data (the official code) | x0 (PDAE) | pd (PD's target; a control)
      stop_fraction=0.3,      # sampling only: the last floor(stop_fraction * N) steps run unshifted (PDAE's 0.3)
      latent_dim=128,         # size of the semantic code z_sem
      encoder_ch=64,          # E_phi's first-stage channels (then 2x, 4x, 4x, ...)
      form='shift',           # shift: a modulated copy of the student's decoder on its frozen encoder features
                              # (PDAE's ShiftUNet); separate: a small stand-alone conv net
      separate_ch=64,         # channels of the 'separate' form
      gradient_param='x_shift',  # what G_tau outputs: x_shift (the x shift sigma^2/alpha g; trains stably at
                              # lambda = -20, where 1-step students live) | score (g itself, as in PDAE)
      init_from_student=False,  # 'shift' form: start G_tau's decoder from the student's weights (output conv
                              # still zero); False = from scratch, as PDAE
  )
  config.sferd.latent = dict(     # the latent diffusion model that samples z_sem without a real image
      num_layers=10,          # MLPSkipNet Dense layers (PDAE: 10)
      width=512,              # hidden width (PDAE: 2048)
      num_steps=100,          # DDIM steps to sample a code
  )
  # Training of E_phi and G_tau (student and teacher frozen), and of the latent model (PDAE's: AdamW 1e-3, wd 0.01).
  # The semantic loss is PD's snr_trunc on the shifted x; the official code weights the x error by (1 + SNR)^2
  # ((1 + SNR) inside the square), PDAE uses eps-MSE weighted by SNR^0.1 / (1 + SNR).
  config.semantic = training_config(train_steps=1000, batch_size=64, learning_rate=1e-4)
  config.latent = training_config(train_steps=1000, batch_size=128, learning_rate=1e-3, weight_decay=0.01,
                                  ema_decay=0.999, loss='eps_mse', grad_clip=1.0)

  config.evaluate = dict(
      models=_optional(tuple),  # exported models to score, as paths in the workdir ('teacher', 'distill/stage_3',
                              # 'consistency@2' for a model at 2 steps);
                              # None = the teacher, every finished stage and the consistency model
      num_steps=_optional(int),  # sampling steps per model; None = each model's own
      guidance=(False,),      # variants to score: without / with attention-guided sampling
      semantic=(False,),      # variants: without / with the semantic gradient predictor (models that have one)
      num_samples=50000,      # samples per variant (50k is the standard FID protocol)
      sample_seeds=_optional(tuple),  # seeds of the samples, each a set of rows; None = (config.seed,). Two seeds
                              # show whether a gap between variants is beyond sampling noise
      round_size=1000,        # samples per saved round; an interrupted evaluation resumes at the last round
      features='auto',        # inception | classifier | auto (inception when weights are given, else the
                              # small classifier trained on the dataset and saved with the run)
      inception_weights=_optional(str),  # .npz made by `python -m sferd_jax.evaluation.export_inception SRC.pt OUT.npz`
      reference_stats=_optional(str),  # .npz of reference mu/sigma; None = computed from config.data, cached in the run
      reference_split=_optional(str),  # the split of config.data the reference statistics come from (e.g. 'test',
                              # held out); None = config.data.split. The NN distances stay against training images
      classifier_steps=300,   # Adam updates (batch 32) of the feature classifier: enough for digits; larger data
                              # needs more (Fashion-MNIST: 300 reach 69% held-out accuracy, the study uses 3000)
      kid_subsets=100,
      kid_subset_size=1000,
  )
  config.analyze = dict(          # the fitting-error analysis (SFERD.md §5)
      model=_optional(str),   # as sample.model
      num_images=16,          # real images x0
      num_noises=8,           # noise draws per image and noise level
      times=(0.2, 0.4, 0.6, 0.8),  # noise levels t (cosine schedule)
  )

  config.sample = dict(
      model=_optional(str),  # exported model dir, or a path in the workdir ('teacher', 'distill/stage_3'); None = last
      num_samples=64,
      num_steps=_optional(int),  # None = the model's own step count
      sampler='auto',        # auto (each model's own: consistency for a consistency model, else ddim) | ddim |
                             # ancestral | consistency
      clip_x=True,
      batch_size=256,        # samples per device call
      guidance=False,        # sample with the attention-guided model (config.sferd.attention_guidance settings)
      semantic=False,        # sample a student with its semantic gradient predictor (a code from the latent model)
  )
  return config


def study_config(*, seeds=(0, 1, 2), steps=(4, 2, 1), bf16_seed=0, analyze=True, results_dir=None,
                 second_sample_seed_offset=1000, inception_weights=None):
  """The `study` section of a study config (configs/study_*.py; --mode=study, sferd_jax/study.py)."""
  return ml_collections.ConfigDict(dict(
      seeds=tuple(seeds),       # distillation seeds (each run's config.seed; the teacher is shared)
      steps=tuple(steps),       # the student step counts scored
      bf16_seed=_optional(int, bf16_seed),  # the seed whose SFERD arm also runs in bfloat16; None = no such arm
      analyze=analyze,          # the fitting-error analysis of the first seed's 1-step students and the teacher
      results_dir=_optional(str, results_dir),  # finished units are mirrored here (to commit) and restored from it
      second_sample_seed_offset=second_sample_seed_offset,  # the first seed's models also at seed + this offset
      inception_weights=_optional(str, inception_weights),  # the FID Inception .npz (export_inception): the 1-step
                              # PD and SFERD students also get Inception FID; None or '' = classifier features only
  ))


def lock(config):
  config.lock()
  return config


def parse_arg(arg, **defaults):
  """A config file's argument, big_vision style: --config=configs/quickstart.py:method=pd (or --config=quickstart:
  method=pd) calls get_config('method=pd'). 'key=value' pairs, comma-separated, each key one of `defaults`, each
  value read as its default's type. Returns a ConfigDict of every key."""
  args = ml_collections.ConfigDict(defaults)
  for pair in filter(None, (arg or '').split(',')):
    key, sep, value = pair.partition('=')
    if not sep or key not in defaults:
      raise errors.ConfigError(f'config argument {pair!r}: expected key=value with key one of {sorted(defaults)}')
    args[key] = type(defaults[key])(value)
  return args


METHODS = ('sferd', 'pd')


def apply_method(config, method):
  """method='pd': the config's plain progressive-distillation baseline (no attention guidance, no semantic
  predictor); 'sferd': the config as written."""
  if method not in METHODS:
    raise errors.ConfigError(f'config argument method={method!r}: expected one of {METHODS}')
  if method == 'pd':
    config.sferd.attention_guidance.enabled = False
    config.phases = tuple(p for p in config.phases if p not in ('semantic', 'latent'))
    config.evaluate.semantic = (False,)
  return config


def _fail(key, message):
  raise errors.ConfigError(f'config.{key}: {message}')


def _validate_training(config, section, *, loss_types):
  cfg = config[section]
  if cfg.train_steps < 1:
    _fail(f'{section}.train_steps', f'must be >= 1, got {cfg.train_steps}')
  if cfg.batch_size < 1:
    _fail(f'{section}.batch_size', f'must be >= 1, got {cfg.batch_size}')
  if cfg.loss not in loss_types:
    _fail(f'{section}.loss', f'must be one of {loss_types}, got {cfg.loss!r}')
  opt = cfg.optimizer
  if not opt.learning_rate > 0:  # 0 trains nothing, a negative rate ascends the loss
    _fail(f'{section}.optimizer.learning_rate', f'must be > 0, got {opt.learning_rate}')
  if opt.name not in OPTIMIZERS:
    _fail(f'{section}.optimizer.name', f'must be one of {OPTIMIZERS}, got {opt.name!r}')
  if opt.schedule not in LR_SCHEDULES:
    _fail(f'{section}.optimizer.schedule', f'must be one of {LR_SCHEDULES}, got {opt.schedule!r}')
  if opt.weight_decay and opt.name != 'adamw':
    _fail(f'{section}.optimizer.weight_decay', "is only applied by name='adamw'; set optimizer.name='adamw'")
  if not 0.0 <= cfg.ema_decay < 1.0:
    _fail(f'{section}.ema_decay', f'must be in [0, 1), got {cfg.ema_decay}')
  for key in ('steps_per_call', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if cfg[key] < 1:
      _fail(f'{section}.{key}', f'must be >= 1, got {cfg[key]}')
  if cfg.train_steps % cfg.steps_per_call:
    _fail(f'{section}.steps_per_call', f'must divide train_steps={cfg.train_steps} (each call runs steps_per_call '
                                       f'steps), got {cfg.steps_per_call}; e.g. steps_per_call='
                                       f'{math.gcd(cfg.train_steps, cfg.steps_per_call)}')


def validate(config):
  """Raises ConfigError naming the key and the fix, for a config that cannot work. Returns the config."""
  # Imported here, not at the top: every config file imports this module, and loading a config needs no JAX.
  # pylint: disable=g-import-not-at-top
  from sferd_jax.data import sources
  from sferd_jax.diffusion import consistency, losses, samplers
  from sferd_jax.models import latent, unet
  from sferd_jax.sferd import guided_teacher, semantic_predictor
  # pylint: enable=g-import-not-at-top
  for phase in config.phases:
    if phase not in PHASES:
      _fail('phases', f'unknown phase {phase!r}; phases are {PHASES}')
  try:
    unet.validate_model_config(config.model)
  except ValueError as e:
    raise errors.ConfigError(f'config.model: {e}') from None
  if config.diffusion.logsnr_min >= config.diffusion.logsnr_max:
    _fail('diffusion', 'logsnr_min must be below logsnr_max')
  for section in ('teacher', 'distill', 'semantic', 'latent'):
    _validate_training(config, section, loss_types=losses.LOSS_TYPES)
  _validate_training(config, 'consistency', loss_types=consistency.DISTANCES)
  cd = config.consistency
  if cd.solver not in consistency.SOLVERS:
    _fail('consistency.solver', f'must be one of {consistency.SOLVERS}, got {cd.solver!r}')
  if cd.num_scales_start < 1 or cd.num_scales_end < 1 or cd.num_steps < 1:
    _fail('consistency', f'num_scales_start, num_scales_end and num_steps must be >= 1; got {cd.num_scales_start}, '
                         f'{cd.num_scales_end}, {cd.num_steps}')
  if not 0.0 <= cd.target_decay < 1.0:
    _fail('consistency.target_decay', f'must be in [0, 1), got {cd.target_decay}')
  start, end = config.distill.start_num_steps, config.distill.end_num_steps
  ratio = start / end if end >= 1 else 0
  if end < 1 or start < end or ratio != int(ratio) or not math.log2(ratio).is_integer():
    _fail('distill.start_num_steps',
          f'must be a power-of-two multiple of end_num_steps (each stage halves the step count); got start '
          f'{start}, end {end}. E.g. start_num_steps=1024, end_num_steps=1')
  if config.sample.sampler not in ('auto',) + samplers.SAMPLERS:
    _fail('sample.sampler', f"must be 'auto' or one of {samplers.SAMPLERS}, got {config.sample.sampler!r}")
  for key in ('sample.num_steps', 'evaluate.num_steps'):
    section, name = key.split('.')
    if config[section][name] is not None and config[section][name] < 1:
      _fail(key, f'must be >= 1, or None for each model\'s own step count; got {config[section][name]}')
  if config.data.name not in sources.SOURCE_NAMES:
    _fail('data.name', f'unknown source {config.data.name!r}; known: {sources.SOURCE_NAMES}')
  for key in ('data.split', 'evaluate.reference_split'):
    section, name = key.split('.')
    if config[section][name] is not None:
      try:
        sources.check_split(config.data.name, config[section][name])
      except ValueError as e:
        raise errors.ConfigError(f'config.{key}: {e}') from None
  if config.sample.guidance and config.sample.semantic:
    _fail('sample.semantic', 'cannot be combined with sample.guidance (no sampler does both); choose one')
  if config.sample.num_samples < 1 or config.sample.batch_size < 1:
    _fail('sample', 'num_samples and batch_size must be >= 1')
  try:
    guided_teacher.validate_config(config.sferd.attention_guidance, config.model)
  except ValueError as e:
    raise errors.ConfigError(f'config.sferd.attention_guidance: {e}') from None
  for key, check in (('sferd.semantic', semantic_predictor.validate_config),
                     ('sferd.latent', latent.validate_latent_config)):
    try:
      check(config.sferd.semantic if key == 'sferd.semantic' else config.sferd.latent)
    except ValueError as e:
      raise errors.ConfigError(f'config.{key}: {e}') from None
  if config.sferd.semantic.init_from_student and config.sferd.semantic.form != 'shift':
    _fail('sferd.semantic.init_from_student', "copies the student's decoder, which only the 'shift' form mirrors")
  stages = num_stages(config)
  for stage in config.sferd.semantic.stages or ():
    if not (1 <= stage <= stages or -stages <= stage <= -1):
      _fail('sferd.semantic.stages', f'stage {stage} does not exist: the run has stages 1..{stages} (or -1 for '
                                     f'the last)')
  if config.evaluate.features not in ('auto', 'inception', 'classifier'):
    _fail('evaluate.features', f"must be auto, inception or classifier, got {config.evaluate.features!r}")
  if ('evaluate' in config.phases and config.evaluate.features == 'inception'
      and not config.evaluate.inception_weights):
    _fail('evaluate.inception_weights', 'features=inception needs the .npz of Inception weights; make it with '
                                        '`python -m sferd_jax.evaluation.export_inception SRC.pt OUT.npz` (README)')
  if config.evaluate.num_samples < 2 or config.evaluate.round_size < 1:
    _fail('evaluate', 'num_samples must be >= 2 and round_size >= 1')
  if config.evaluate.classifier_steps < 1:
    _fail('evaluate.classifier_steps', f'must be >= 1, got {config.evaluate.classifier_steps}')
  if not isinstance(config.get('profile_steps', 0), int) or config.get('profile_steps', 0) < 0:
    _fail('profile_steps', f'must be a count of steps >= 0 (0: no trace); got {config.profile_steps}')
  if any(not isinstance(key, str) or not key for key in config.allow_changes):
    _fail('allow_changes', f"must be config keys, e.g. ('distill.optimizer.learning_rate',); got "
                           f"{config.allow_changes}")
  seeds = config.evaluate.sample_seeds or ()
  if any(not isinstance(seed, int) or seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
    _fail('evaluate.sample_seeds', f'must be distinct non-negative ints, e.g. (0, 1), or None; got {seeds}')
  if config.data.name == 'npz' and not config.data.path:
    _fail('data.path', "name='npz' needs the path of an .npz file with an 'images' array (N, H, W, C) uint8")
  return config


DEFAULT_SEMANTIC_STAGES = (-3, -2, -1)  # the 1-, 2- and 4-step students of a run that ends at 1 step


def semantic_stages(config):
  """The distillation stages (1-based) that get a semantic gradient predictor."""
  n = num_stages(config)
  stages = config.sferd.semantic.stages
  if stages is None:
    stages = [s for s in DEFAULT_SEMANTIC_STAGES if s >= -n]
  return sorted({s if s > 0 else n + 1 + s for s in stages})


def num_stages(config):
  """Distillation stages: start_num_steps -> ... -> end_num_steps, halving."""
  return int(round(math.log2(config.distill.start_num_steps / config.distill.end_num_steps)))


def to_json(value):
  """A ConfigDict, mapping or value as plain JSON types (tuples become lists), for saving and comparing."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=list))
