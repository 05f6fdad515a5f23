r"""Throughput of sferd_jax's train steps and 1-step samplers: one JSON line per measurement on stdout.

  python bench/bench.py                                   # tiny config: a CPU smoke test
  python bench/bench.py --config=configs/cifar10_stage.py --batch_size=128 --steps=20 --warmup=3

Protocol: random parameters (drawn on the host in the models' shapes; the zero-initialised output layers get
weights too, so every path computes something non-degenerate), fixed random batches, AOT compilation (train steps
through loop.compile_step, the training loop's own, so bench measures the executable training runs), warm-up
calls, then --steps timed calls, each run to completion. The plain and the attention-guided distill steps are timed
alternately in one run, and so are sampling with and without the semantic predictor, so that each ratio sees the
same machine load. FLOPs are XLA's HLO cost analysis before compilation (loop.cost_flops). bench/README.md
explains every field.
"""

import argparse
import ast
import copy
import importlib.util
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere: python bench/bench.py
  sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import flax
import jax
import jax.numpy as jnp
import numpy as np

from sferd_jax import config as config_lib
from sferd_jax.models import latent as latent_lib
from sferd_jax.models import semantic as semantic_lib
from sferd_jax.models import unet
from sferd_jax import sampling
from sferd_jax.sferd import guided_teacher
from sferd_jax import sharding
from sferd_jax.training import loop
from sferd_jax.training import phases
# pylint: enable=wrong-import-position

MEASURES = ('teacher', 'distill', 'guided', 'consistency', 'semantic', 'sample')
TRAIN_SECTIONS = ('teacher', 'distill', 'consistency', 'semantic')
DTYPES = ('float32', 'bfloat16')
# The bound: the guided teacher does 1.4x the forward passes of a plain distill step (4 teacher passes +
# 3 student-equivalents vs 2 + 3), and the guided step may cost at most 1.45x the plain one.
GUIDED_FORWARD_RATIO = 7 / 5
GUIDED_LIMIT = 1.45


def log(message):
  print(f'bench: {message}', file=sys.stderr, flush=True)


def load_config(path, *, batch_size=None, dtype=None, overrides=()):
  """A configs/*.py file's config with bench's overrides: (key, value) pairs ('model.ch', 64), then every train
  section's batch size and the compute dtype."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config: no config file at {path}')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'bench_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  # A locked ConfigDict still takes new values for its existing keys, and refuses new ones.
  for key, value in overrides:
    *parents, last = key.split('.')
    target = config
    for part in parents:
      target = target[part]
    target[last] = value
  if batch_size:
    for section in TRAIN_SECTIONS:
      config[section].batch_size = batch_size
  if dtype:
    config.model.dtype = dtype
  return config_lib.validate(config)


def metadata(config, *, config_name, mesh, params, overrides=()):
  """The fields every JSON line carries (with its batch_size): where it ran and on what."""
  device = mesh.devices.flat[0]
  return dict(device_kind=device.device_kind, platform=device.platform, device_count=int(mesh.devices.size),
              jax_version=jax.__version__, flax_version=flax.__version__,
              prng_impl=jax.config.jax_default_prng_impl, config=config_name,
              overrides=config_lib.to_json(dict(overrides)), dtype=config.model.dtype,
              unet_params_m=round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 3))


# Inputs.


def random_params(init, seed=0):
  """Random parameters shaped as init(rng) makes them, drawn on the host: kernels LeCun-normal, norm scales near
  1, biases near 0, so that zero-initialised output layers compute something too.

  Not init itself under jit: XLA:CPU takes ~20 s to compile even the tiny U-Net's initialisers (most of a CPU
  bench's wall time), and the values only need to be realistic, not the initialisers' own.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape, dtype=np.float32)
    if getattr(path[-1], 'key', None) == 'scale':
      value = 1.0 + 0.01 * noise
    elif leaf.ndim < 2:
      value = 0.01 * noise
    else:
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init, jax.random.key(0)))


def unet_params(config, seed=0):
  model = unet.make_unet(config.model)
  return random_params(lambda rng: unet.init_params(model, rng, model_config=config.model), seed)


def random_batches(config, *, batch_size, steps_per_call, seed=0):
  """Fixed host batches shaped as Batches.get's: 'image' (K, B, H, W, C) float32 in [-1, 1], 'label' (K, B)."""
  rng = np.random.default_rng(seed)
  shape = (steps_per_call, batch_size, config.model.image_size, config.model.image_size, config.model.channels)
  images = rng.integers(0, 256, shape).astype(np.float32) / 127.5 - 1.0
  labels = rng.integers(0, max(config.model.num_classes, 1), shape[:2]).astype(np.int32)
  return {'image': images, 'label': labels}


def init_state(spec, params, *, mesh):
  """The phase's TrainState on a copy of params: the step donates its state, and the same params may be a teacher
  argument (jit would otherwise forward the input buffers into the state unchanged)."""
  create = lambda p: spec.create(jax.tree.map(jnp.copy, p))
  return jax.jit(create, out_shardings=sharding.replicated(mesh))(params)


# Timing.


class Timed:
  """A compiled function and its arguments. Each call runs it to completion and records the seconds it took.

  carry=True feeds output[0] back as argument 0, as the training loop does with the (donated) train state.
  """

  def __init__(self, name, fn, args, *, carry=False):
    self.name, self.fn, self.args, self.carry = name, fn, tuple(args), carry
    self.seconds, self.out = [], None

  def __call__(self, *, record=True):
    start = time.perf_counter()
    out = jax.block_until_ready(self.fn(*self.args))
    elapsed = time.perf_counter() - start
    if self.carry:
      self.args = (out[0],) + self.args[1:]
    if record:
      self.seconds.append(elapsed)
    self.out = out


def run_timed(timed, *, warmup, steps):
  """Warm-up calls of each, then `steps` timed calls of each, interleaved (a, b, a, b, ...)."""
  log(f'{", ".join(t.name for t in timed)}: {warmup} warm-up and {steps} timed calls' + (' each' if timed[1:] else ''))
  for t in timed:
    for _ in range(warmup):
      t(record=False)
  for _ in range(steps):
    for t in timed:
      t()


def timing_fields(timed, *, images_per_call, steps_per_call, flops_per_call, warmup):
  """Median and min ms per step, images/s at the median, achieved TFLOP/s; flops_per_call None if unknown."""
  call_s = sorted(timed.seconds)
  median_s = statistics.median(call_s)
  return dict(
      steps_per_call=steps_per_call, warmup=warmup, calls_timed=len(call_s), steps_timed=len(call_s) * steps_per_call,
      median_ms=1e3 * median_s / steps_per_call, min_ms=1e3 * call_s[0] / steps_per_call,
      images_per_s=images_per_call / median_s,
      gflop_per_step=flops_per_call / steps_per_call / 1e9 if flops_per_call else None,
      tflops_per_s=flops_per_call / median_s / 1e12 if flops_per_call else None)


# Train steps.


def _log_compiled(name, seconds, flops):
  log(f'{name}: compiled in {seconds:.1f} s, ' + (f'{flops / 1e9:.1f} GFLOP per call' if flops else 'FLOPs unknown'))


class TrainStep:
  """A train step (step, state, extra arguments) compiled by loop.compile_step for fixed inputs, ready to time."""

  def __init__(self, name, spec, batches, *, mesh):
    step, state, extra = spec
    args = (state, sharding.put_batch(batches, mesh), jax.random.key(0)) + tuple(sharding.put_replicated(extra, mesh))
    log(f'{name}: compiling')
    self.compiled, self.compile_s, self.flops = loop.compile_step(step, mesh, args)
    _log_compiled(name, self.compile_s, self.flops)
    self.timed = Timed(name, self.compiled, args, carry=True)
    self.images_per_call = int(np.prod(batches['image'].shape[:2]))
    self.steps_per_call = batches['image'].shape[0]

  def fields(self, warmup):
    metrics = jax.device_get(self.timed.out[1])
    return dict(timing_fields(self.timed, images_per_call=self.images_per_call, steps_per_call=self.steps_per_call,
                              flops_per_call=self.flops, warmup=warmup),
                compile_s=self.compile_s, loss=float(np.mean(metrics['loss'])))


def teacher_step(config, *, params, mesh):
  """(step, state, extra arguments) of the teacher phase."""
  spec = phases.build(config, 'teacher')
  return spec.step, init_state(spec, params, mesh=mesh), ()


def with_guidance(config, guided):
  """The config with its attention-guidance section switched on (it must have a nonzero weight) or off."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.sferd.attention_guidance.enabled = bool(guided)
  if guided and not guided_teacher.is_active(config.sferd.attention_guidance):
    raise ValueError('config.sferd.attention_guidance.weight is 0: the guided step would be the plain one')
  return config


def distill_step(config, *, params, mesh, guided):
  """The first stage's distill step (its cost does not depend on the stage), the student starting as the teacher."""
  spec = phases.build(with_guidance(config, guided), 'distill')
  return spec.step, init_state(spec, params, mesh=mesh), (params, jnp.int32(student_steps(config)))


def consistency_step(config, *, params, mesh):
  """The consistency-distillation step (its solver, and the teacher guided, as the config says), the student and
  its target network starting as the teacher."""
  spec = phases.build(config, 'consistency')
  return spec.step, init_state(spec, params, mesh=mesh), (params,)


def student_steps(config):
  return config.distill.start_num_steps // 2


def semantic_student_steps(config):
  return config.distill.start_num_steps // 2**config_lib.semantic_stages(config)[0]


def semantic_step(config, *, params, mesh):
  """E_phi and G_tau's step on a frozen student, with the teacher guided as the config says (as the pipeline)."""
  spec = phases.build(config, 'semantic')
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  semantic_params = random_params(
      lambda rng: semantic_lib.init_semantic_params(encoder, predictor, rng, model_config=config.model), seed=1)
  # The student and the teacher share the random params: only their shapes matter for the cost.
  return spec.step, init_state(spec, semantic_params, mesh=mesh), (
      params, params, jnp.int32(semantic_student_steps(config)))


# Sampling.


def semantic_predictor_params(config, seed=2):
  """sample()'s semantic_params: {'predictor': G_tau, 'latent': the latent denoiser, 'stats': code statistics}."""
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  dim = config.sferd.semantic.latent_dim
  latent_model = latent_lib.make_latent_model(config.sferd.latent, num_classes=config.model.num_classes)
  both = random_params(
      lambda rng: semantic_lib.init_semantic_params(encoder, predictor, rng, model_config=config.model), seed)
  return {'predictor': both['predictor'],
          'latent': random_params(lambda rng: latent_lib.init_latent_params(latent_model, rng, dim=dim), seed + 1),
          'stats': {'mean': jnp.zeros((dim,), jnp.float32), 'std': jnp.ones((dim,), jnp.float32)}}


class Sampler:
  """The jitted function sample() runs for one batch (sampling.batch_sampler), AOT-compiled for fixed inputs.

  Timed without sample()'s host work around it (initial noise, uint8 conversion, the copy to the host).
  """

  def __init__(self, config, *, params, batch_size, num_steps, num_devices, semantic):
    semantic_config = semantic_params = None
    if semantic:
      semantic_config = {'semantic': config.sferd.semantic.to_dict(), 'latent': config.sferd.latent.to_dict(),
                         'latent_num_classes': int(config.model.num_classes)}
      semantic_params = semantic_predictor_params(config)
    run, mesh = sampling.batch_sampler(config.model, diffusion_config=config.diffusion.to_dict(),
                                       semantic_config=semantic_config, num_devices=num_devices)
    shape = (config.model.image_size, config.model.image_size, config.model.channels)
    data = sharding.batch_sharding(mesh, leading_axes=0)
    z = jax.device_put(sampling.initial_noise(jax.random.key(3), num_samples=batch_size, shape=shape), data)
    labels = jax.device_put(np.zeros((batch_size,), np.int32), data)
    code_keys = jax.device_put(sampling.sample_keys(jax.random.key(5), num_samples=batch_size), data) \
        if semantic else None  # one key per sample for its code z_sem
    args = (sharding.put_replicated(params, mesh), z, labels) + tuple(
        sharding.put_replicated((jax.random.key(4), jnp.int32(num_steps), semantic_params), mesh)) + (code_keys,)
    name = f'{num_steps}-step sampler' + (' with the semantic predictor' if semantic else '')
    log(f'{name}: compiling')
    start = time.perf_counter()
    lowered = run.lower(*args)
    compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.flops = loop.cost_flops(lowered)
    _log_compiled(name, self.compile_s, self.flops)
    self.timed = Timed(name, compiled, args)
    self.batch_size = batch_size

  def fields(self, warmup):
    finite = bool(np.all(np.isfinite(jax.device_get(self.timed.out))))
    return dict(timing_fields(self.timed, images_per_call=self.batch_size, steps_per_call=1,
                              flops_per_call=self.flops, warmup=warmup),
                compile_s=self.compile_s, finite=finite)


# Measurements: each returns its JSON records.


def measure_teacher(config, *, meta, params, batches, mesh, warmup, steps):
  step = TrainStep('teacher step', teacher_step(config, params=params, mesh=mesh), batches, mesh=mesh)
  run_timed([step.timed], warmup=warmup, steps=steps)
  return [dict(measure='teacher', **meta, **step.fields(warmup))]


def measure_distill(config, *, meta, params, batches, mesh, warmup, steps, guided=True):
  """The plain distill step and, with guided, the attention-guided one, timed alternately; the guided record
  carries the ratios to the plain one."""
  plain = TrainStep('distill step', distill_step(config, params=params, mesh=mesh, guided=False), batches, mesh=mesh)
  measured = [plain]
  if guided:
    measured.append(TrainStep('guided distill step', distill_step(config, params=params, mesh=mesh, guided=True),
                              batches, mesh=mesh))
  run_timed([m.timed for m in measured], warmup=warmup, steps=steps)
  common = dict(student_steps=student_steps(config))
  plain_fields = plain.fields(warmup)
  records = [dict(measure='distill', **meta, **common, guided=False, **plain_fields)]
  if guided:
    fields = measured[1].fields(warmup)
    ms_ratio = fields['median_ms'] / plain_fields['median_ms']
    records.append(dict(
        measure='distill_guided', **meta, **common, guided=True,
        guidance_block=guided_teacher.guidance_block(config.model, config.sferd.attention_guidance), **fields,
        plain_median_ms=plain_fields['median_ms'], ms_ratio=ms_ratio,
        min_ms_ratio=fields['min_ms'] / plain_fields['min_ms'],
        flop_ratio=fields['gflop_per_step'] / plain_fields['gflop_per_step']
        if fields['gflop_per_step'] and plain_fields['gflop_per_step'] else None,
        forward_ratio=GUIDED_FORWARD_RATIO, ratio_limit=GUIDED_LIMIT, meets_limit=bool(ms_ratio <= GUIDED_LIMIT)))
  return records


def measure_consistency(config, *, meta, params, batches, mesh, warmup, steps):
  step = TrainStep('consistency step', consistency_step(config, params=params, mesh=mesh), batches, mesh=mesh)
  run_timed([step.timed], warmup=warmup, steps=steps)
  return [dict(measure='consistency', **meta, solver=config.consistency.solver,
               guided=guided_teacher.is_active(config.sferd.attention_guidance), **step.fields(warmup))]


def measure_semantic(config, *, meta, params, batches, mesh, warmup, steps):
  step = TrainStep('semantic step', semantic_step(config, params=params, mesh=mesh), batches, mesh=mesh)
  run_timed([step.timed], warmup=warmup, steps=steps)
  return [dict(measure='semantic', **meta, student_steps=semantic_student_steps(config),
               guided=guided_teacher.is_active(config.sferd.attention_guidance),
               semantic_form=config.sferd.semantic.form, **step.fields(warmup))]


def measure_sample(config, *, meta, params, mesh, warmup, steps, batch_size, num_steps):
  """num_steps-step sampling without and with the semantic predictor (its latent sampler included), alternately."""
  kwargs = dict(params=params, batch_size=batch_size, num_steps=num_steps, num_devices=int(mesh.devices.size))
  plain = Sampler(config, semantic=False, **kwargs)
  shifted = Sampler(config, semantic=True, **kwargs)
  run_timed([plain.timed, shifted.timed], warmup=warmup, steps=steps)
  plain_fields, shifted_fields = plain.fields(warmup), shifted.fields(warmup)
  return [dict(measure='sample', **meta, num_steps=num_steps, semantic=False, **plain_fields),
          dict(measure='sample_semantic', **meta, num_steps=num_steps, semantic=True,
               latent_steps=config.sferd.latent.num_steps, semantic_form=config.sferd.semantic.form, **shifted_fields,
               plain_median_ms=plain_fields['median_ms'],
               ms_ratio=shifted_fields['median_ms'] / plain_fields['median_ms'])]


def run(args, emit):
  """Runs the measurements args.only asks for, emitting each record as soon as it is made; returns them all."""
  only = set(args.only)
  config = load_config(args.config, batch_size=args.batch_size, dtype=args.dtype, overrides=args.override)
  devices = jax.devices()[:args.num_devices] if args.num_devices else jax.devices()
  mesh = sharding.make_mesh(devices)
  params = unet_params(config)
  meta = metadata(config, config_name=os.path.splitext(os.path.basename(args.config))[0], mesh=mesh,
                  params=params, overrides=args.override)
  records = []

  def done(new):
    for record in new:
      emit(record)
    records.extend(new)

  def train_kwargs(section):
    """Each train section's own batch size, as training uses it (all equal under --batch_size)."""
    size = config[section].batch_size
    sharding.check_batch_size(size, mesh, what=f'config.{section}.batch_size')
    return dict(meta=dict(meta, batch_size=size), params=params, mesh=mesh, warmup=args.warmup, steps=args.steps,
                batches=random_batches(config, batch_size=size, steps_per_call=args.steps_per_call))

  if 'teacher' in only:
    done(measure_teacher(config, **train_kwargs('teacher')))
  if only & {'distill', 'guided'}:
    done(measure_distill(config, guided='guided' in only, **train_kwargs('distill')))
  if 'consistency' in only:
    done(measure_consistency(config, **train_kwargs('consistency')))
  if 'semantic' in only:
    done(measure_semantic(config, **train_kwargs('semantic')))
  if 'sample' in only:
    size = args.sample_batch_size or args.batch_size or config.sample.batch_size
    sharding.check_batch_size(size, mesh, what='--sample_batch_size')
    done(measure_sample(config, meta=dict(meta, batch_size=size), params=params, mesh=mesh, warmup=args.warmup,
                        steps=args.steps, batch_size=size, num_steps=args.sample_steps))
  return records


SUMMARY_COLUMNS = (('measure', '{}'), ('device_kind', '{}'), ('config', '{}'), ('dtype', '{}'), ('batch_size', '{}'),
                   ('median_ms', '{:.2f}'), ('min_ms', '{:.2f}'), ('images_per_s', '{:.4g}'),
                   ('gflop_per_step', '{:.2f}'), ('tflops_per_s', '{:.3f}'), ('compile_s', '{:.1f}'),
                   ('ms_ratio', '{:.3f}'), ('flop_ratio', '{:.3f}'))


def summarize(records):
  """A Markdown table of bench records, one row each (how bench/README.md's tables are made)."""
  def cell(record, key, fmt):
    value = record.get(key)
    return '' if value is None else fmt.format(value)
  lines = ['| ' + ' | '.join(key for key, _ in SUMMARY_COLUMNS) + ' |', '|' + '---|' * len(SUMMARY_COLUMNS)]
  lines += ['| ' + ' | '.join(cell(r, key, fmt) for key, fmt in SUMMARY_COLUMNS) + ' |' for r in records]
  return '\n'.join(lines)


def _measures(value):
  names = [v.strip() for v in value.split(',') if v.strip()]
  unknown = [n for n in names if n not in MEASURES]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f'{value!r}: choose a comma list from {",".join(MEASURES)}')
  return names


def _override(value):
  key, sep, text = value.partition('=')
  if not sep or not key:
    raise argparse.ArgumentTypeError(f'{value!r}: use KEY=VALUE, e.g. sferd.attention_guidance.block=dec16_3_attn')
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text  # a bare word: a string


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'tiny.py'), help='a configs/*.py file')
  parser.add_argument('--batch_size', type=int, default=None,
                      help="global batch of every train step (default: each config section's) and of sampling")
  parser.add_argument('--sample_batch_size', type=int, default=None,
                      help="sampling batch (default: --batch_size, else config.sample.batch_size)")
  parser.add_argument('--sample_steps', type=int, default=1, help='sampling steps (the distilled student: 1)')
  parser.add_argument('--steps', type=int, default=5, help='timed calls per measurement')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls before the timed ones')
  parser.add_argument('--steps_per_call', type=int, default=1, help='train steps per call (lax.scan, as training)')
  parser.add_argument('--only', type=_measures, default=list(MEASURES),
                      help=f'comma list of {",".join(MEASURES)} (guided times the plain distill step too)')
  parser.add_argument('--dtype', choices=DTYPES, default=None, help="compute dtype (default: the config's)")
  parser.add_argument('--override', type=_override, action='append', default=[],
                      help='KEY=VALUE: set a config key (a Python literal, else a string); repeatable')
  parser.add_argument('--num_devices', type=int, default=0, help='use the first N devices (default: all)')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  parser.add_argument('--summarize', default=None, metavar='JSONL',
                      help='print a Markdown table of the JSON lines in this file, and measure nothing')
  args = parser.parse_args(argv)
  for name in ('steps', 'steps_per_call', 'sample_steps'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be >= 1')
  if args.warmup < 0:
    parser.error('--warmup must be >= 0')
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.summarize:
    with open(args.summarize, encoding='utf-8') as f:
      records = [json.loads(line) for line in f if line.strip()]
    print(summarize(records))
    return records
  out = open(args.out, 'a', encoding='utf-8') if args.out else None  # pylint: disable=consider-using-with

  def emit(record):
    line = json.dumps(record)
    print(line, flush=True)
    if out:
      out.write(line + '\n')
      out.flush()

  try:
    return run(args, emit)
  finally:
    if out:
      out.close()


if __name__ == '__main__':
  main()
