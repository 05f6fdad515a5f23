r"""sferd_jax command line (also installed as `sferd`): train, distill, sample and evaluate.

  python -m sferd_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  sferd --config=quickstart --workdir=runs/quickstart --mode=sample --config.sample.num_steps=4

--config takes a config file's path or the name of one shipped with the package (quickstart, cifar10_stage, ...),
optionally with its argument (quickstart:method=pd). Any config key can be overridden with --config.<key>=<value>.
Running the same command again resumes.
"""

import contextlib
import difflib
import json
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from sferd_jax import config as config_lib
from sferd_jax import errors

# Modes that run one phase of the pipeline (pipeline.run_phase), by the phase's name.
PHASE_MODES = {'train_teacher': 'teacher', 'distill': 'distill', 'consistency': 'consistency', 'semantic': 'semantic',
               'latent': 'latent', 'evaluate': 'evaluate'}
MODES = ('pipeline', *PHASE_MODES, 'sample', 'analyze', 'study')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config: the name of one shipped with sferd_jax (quickstart, cifar10_teacher, cifar10_stage, '
    '...) or the path of a config file, optionally with its argument (quickstart:method=pd).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, exported models, samples, metrics.')
_JIT_CACHE = flags.DEFINE_string(
    'jit_cache', os.path.join(os.path.expanduser('~'), '.cache', 'sferd_jax', 'jit'),
    "JAX's persistent compilation cache (per machine): a resumed run or the next phase skips compiles it has "
    "already paid for. Empty to disable.")
_MODE = flags.DEFINE_enum('mode', 'pipeline', MODES, 'pipeline runs every phase in config.phases, in order; the '
                          'others run one phase (resuming it) or a tool: sample, evaluate, analyze, study (a study '
                          'config: the ablation of configs/study_fashion_mnist.py).')


class _QuietLogs(std_logging.Filter):
  """Drops the INFO lines nobody acts on: Orbax's for every save and restore, and JAX's that a machine without a TPU
  has no libtpu. Warnings and errors always pass."""

  def filter(self, record):
    if record.levelno >= std_logging.WARNING:
      return True
    return '/orbax/' not in record.pathname and "Unable to initialize backend 'tpu'" not in record.getMessage()


def shipped_configs():
  """{name: path} of the configs that come with sferd_jax: configs/ of a checkout, or the installed package's."""
  package = os.path.dirname(os.path.abspath(__file__))
  for folder in (os.path.join(os.path.dirname(package), 'configs'), os.path.join(package, 'configs')):
    if os.path.isdir(folder):
      return {name[:-3]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
              if name.endswith('.py') and not name.startswith('_')}
  return {}


def resolve_config_arg(value):
  """--config's value with a shipped config's name replaced by its path: 'quickstart:method=pd' ->
  '<configs>/quickstart.py:method=pd'. Paths pass unchanged; an unknown name is a ConfigError listing the names."""
  name, sep, arg = value.partition(':')
  if os.path.isfile(name):
    return value
  configs = shipped_configs()
  if name not in configs:
    raise errors.ConfigError(f'--config={value}: no config file {name!r} and no shipped config of that name; the '
                             f'shipped ones are {", ".join(configs)} (or pass the path of a .py file)')
  return configs[name] + sep + arg


def _config_value(argv):
  """(index, value) of --config in argv ('--config=X' or '--config X'), or (None, None)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return i, arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return i + 1, argv[i + 1]
  return None, None


def _config_keys(config, prefix=''):
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _config_keys(value, f'{prefix}{key}.')


def unknown_override(argv, config):
  """The first --config.<key> of argv that names no key of `config`, with the nearest valid keys; or None."""
  keys = sorted(_config_keys(config))
  for arg in argv:
    match = re.match(r'--config\.([^=\s]+)', arg)
    if match and match.group(1) not in keys:
      key = match.group(1)
      near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
      near += [k for k in keys if k.rsplit('.', 1)[-1] == key.rsplit('.', 1)[-1] and k not in near][:3 - len(near)]
      return key, near
  return None


def _load_config_file(value):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = value.partition(':')
  spec = importlib.util.spec_from_file_location('sferd_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_flags(argv):
  """absl's flag parsing, with config names resolved and a config key that does not exist reported in one line
  (with the nearest valid keys) instead of ml_collections' traceback."""
  argv = list(argv)
  index, value = _config_value(argv)
  try:
    if index is not None:
      resolved = resolve_config_arg(value)
      argv[index] = '--config=' + resolved if argv[index].startswith('--config=') else resolved
  except errors.ConfigError as e:
    _fail(e)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a value of the wrong type, or the config file's own ConfigError
    chain, cause = [], e
    while cause is not None:
      chain.append(cause)
      cause = cause.__cause__ or cause.__context__
    own = [c for c in chain if isinstance(c, errors.USER_ERRORS)]  # the innermost: ml_collections wraps it
    _fail(own[-1] if own else f'{str(e).splitlines()[0]} (--helpfull lists the flags)')
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    if index is None:
      raise
    try:
      unknown = unknown_override(argv, _load_config_file(argv[index].removeprefix('--config=')))
    except Exception:  # pylint: disable=broad-except  (the config itself is broken: its own error says more)
      unknown = None
    if unknown is None:
      _fail(f'--config: {type(e).__name__}: {e}')
    key, near = unknown
    _fail(f'--config.{key}: the config has no key {key!r}' + (f'; did you mean {" or ".join(near)}?' if near else ''))


def _fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(errors.USER_ERROR_EXIT_CODE)


def _save_config(config, workdir, *, replace):
  """config_<mode>.json: written when the run starts if there is none, and when it ends well (a refused or failed
  run leaves the record of the last good one). One writer, process 0; the others would race it."""
  from sferd_jax import files, sharding  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, f'config_{_MODE.value}.json')

  def write():
    try:
      if replace or not files.exists(path):
        files.write_text_atomic(path, json.dumps(config.to_dict(), indent=2, default=list))
    except OSError as e:
      raise errors.ConfigError(f'--workdir={workdir} is not writable ({e}); choose another folder') from None

  sharding.on_process_zero(write, what=f'writing {path}')


def _run_study(config, workdir):
  from sferd_jax import study  # pylint: disable=g-import-not-at-top
  if 'study' not in config:
    raise errors.ConfigError('--mode=study needs a study config (a `study` section), e.g. '
                             '--config=configs/study_fashion_mnist.py')
  study.run_study(config, workdir)


def _write_samples(config, workdir):
  """The sample mode: a PNG grid and an .npz of config.sample.num_samples samples of config.sample.model."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sferd_jax import exports, files, images, layout, sampling  # pylint: disable=g-import-not-at-top
  model = exports.load(exports.in_workdir(config.sample.model, workdir))
  if config.sample.semantic and not model.has_semantic:
    raise errors.CheckpointError(f'{model.path} has no semantic gradient predictor: run the semantic and latent '
                                 f'phases for its stage, or sample it without --config.sample.semantic')
  num_steps = config.sample.num_steps or model.config.num_steps
  guidance = dict(config.sferd.attention_guidance, enabled=True) if config.sample.guidance else None
  semantic = {'semantic': True, 'stop_fraction': config.sferd.semantic.stop_fraction} if config.sample.semantic else {}
  samples = model.sample(jax.random.key(config.seed), num_samples=config.sample.num_samples, num_steps=num_steps,
                         sampler=config.sample.sampler, clip_x=config.sample.clip_x, guidance=guidance,
                         batch_size=config.sample.batch_size, **semantic)
  sampler = sampling.resolve_sampler(model.config.model, config.sample.sampler)
  name = (f'{model.config.name}_{num_steps}steps_{sampler}' + ('_guided' if guidance else '')
          + ('_semantic' if config.sample.semantic else ''))
  if jax.process_index() != 0:  # every process samples the same images; one writes them
    return
  out = os.path.join(layout.RunLayout(workdir).samples_dir, name)
  images.save_grid(out + '.png', samples[:256])
  with files.atomic_path(out + '.npz') as tmp:
    np.savez_compressed(tmp, images=samples)
  print(f'wrote {len(samples)} samples of {model.path} ({num_steps} steps): {out}.png (the first '
        f'{min(len(samples), 256)} as a grid) and {out}.npz (all, uint8)')


@contextlib.contextmanager
def _lock(workdir):
  """One run per run folder (files.run_lock), taken by process 0 of a multi-host job for all of them (when it
  cannot, every process stops); the sample mode only reads models and writes its own files, so it may run beside a
  training run."""
  from sferd_jax import files, sharding  # pylint: disable=g-import-not-at-top
  if _MODE.value == 'sample':
    yield
    return
  with contextlib.ExitStack() as held:

    def take():
      try:
        files.makedirs(workdir)
      except OSError as e:
        raise errors.ConfigError(f'--workdir={workdir} cannot be created ({e}); choose another folder') from None
      held.enter_context(files.run_lock(workdir))

    sharding.on_process_zero(take, what=f'locking {workdir}')
    yield


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('absl', 'jax._src.xla_bridge'):  # a logger's filter sees only its own records
    std_logging.getLogger(name).addFilter(_QuietLogs())
  logging.set_verbosity(logging.INFO)
  if _JIT_CACHE.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', _JIT_CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  from sferd_jax import files, pipeline, sharding  # pylint: disable=g-import-not-at-top
  from sferd_jax.evaluation import fitting_error  # pylint: disable=g-import-not-at-top
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    if config is None or not workdir:
      raise errors.ConfigError('pass --config=<name or configs/<name>.py> and --workdir=<run folder>')
    config_lib.validate(config)
    files.check_reachable(workdir)
    sharding.initialize_distributed()  # before anything asks for devices or the process index
    with _lock(workdir):
      if _MODE.value != 'sample':  # a sample that fails leaves nothing behind
        _save_config(config, workdir, replace=False)
      if _MODE.value in PHASE_MODES:
        pipeline.run_phase(config, workdir, PHASE_MODES[_MODE.value])
      else:
        tools = {'pipeline': pipeline.run_pipeline, 'sample': _write_samples, 'analyze': fitting_error.run_analysis,
                 'study': _run_study}
        tools[_MODE.value](config, workdir)
      _save_config(config, workdir, replace=True)
  except errors.USER_ERRORS as e:  # the user's to fix: one message on stderr, no traceback
    _fail(e)


def run():
  """The `sferd` console script."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
