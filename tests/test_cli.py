"""The command line as a user meets it: a run, the sample mode, and bad input ending in one clear message."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from sferd_jax import errors
import tiny


def _main(*args, timeout=600, cwd=tiny.ROOT):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([tiny.ROOT, os.environ.get('PYTHONPATH', '')]))
  return subprocess.run([sys.executable, '-m', 'sferd_jax.main', *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_train_teacher_then_sample_a_grid_and_npz(tmp_path):
  workdir = str(tmp_path / 'run')
  result = _main('--config=configs/tiny.py', f'--workdir={workdir}', '--mode=train_teacher')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ETA' in result.stderr and 'img/s' in result.stderr
  result = _main('--config=configs/tiny.py', f'--workdir={workdir}', '--mode=sample', '--config.sample.model=teacher',
                 '--config.sample.num_samples=5', '--config.sample.num_steps=3')
  assert result.returncode == 0, result.stderr[-3000:]
  samples = os.path.join(workdir, 'samples')
  assert os.path.exists(os.path.join(samples, 'teacher_3steps_ddim.png'))
  assert f"{os.path.join(samples, 'teacher_3steps_ddim')}.png" in result.stdout  # says where
  images = np.load(os.path.join(samples, 'teacher_3steps_ddim.npz'))['images']
  assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
  result = _main('--config=configs/tiny.py', f'--workdir={workdir}', '--mode=sample', '--config.sample.semantic=True')
  assert result.returncode == errors.USER_ERROR_EXIT_CODE and 'has no semantic gradient predictor' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('override, message', [
    ('--config.model.attn_resolutions=(3,)', 'never reached'),
    ('--config.model.image_size=9', 'divisible'),
    ('--config.distill.start_num_steps=6', 'power-of-two multiple'),
    ('--config.sferd.attention_guidance.block=dec99_0_attn', 'not an attention block'),
    ('--config.data.name=cifar10', 'cifar10'),
])
def test_bad_config_ends_with_one_clear_error(tmp_path, override, message):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', override)
  assert result.returncode == errors.USER_ERROR_EXIT_CODE, result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(error) == 1 and message in error[0], result.stderr[-3000:]
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('args, message', [
    (('--config=configs/tiny.py', '--config.model.chanels=3'),
     "--config.model.chanels: the config has no key 'model.chanels'; did you mean model.channels"),
    (('--config=tiny', '--config.distil.train_steps=3'), 'did you mean distill.train_steps'),
    (('--config=tiny', '--config.distill.learning_rate=1e-3'), 'did you mean distill.optimizer.learning_rate'),
    (('--config=tiny', '--config.distill.train_steps=abc'), "invalid literal for int() with base 10: 'abc'"),
    (('--config=tinny',), "no config file 'tinny' and no shipped config of that name; the shipped ones are"),
    (('--config=quickstart:method=ddim',), "config argument method='ddim': expected one of ('sferd', 'pd')"),
    (('--config=quickstart:mthod=pd',), "config argument 'mthod=pd': expected key=value with key one of"),
    (('--config=tiny', '--workdr=x'), "Unknown command line flag 'workdr'. Did you mean: workdir ?"),
])
def test_command_line_mistakes_are_one_line_errors_that_say_what_to_type(tmp_path, args, message):
  result = _main(*args, f'--workdir={tmp_path / "run"}')
  assert result.returncode == errors.USER_ERROR_EXIT_CODE, result.stderr[-3000:]
  assert result.stderr.count('error: ') == 1 and message in result.stderr, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and not os.path.exists(tmp_path / 'run')


def test_configs_by_name_with_arguments_and_the_console_script(tmp_path):
  from sferd_jax import main  # pylint: disable=g-import-not-at-top
  configs = main.shipped_configs()
  assert {'quickstart', 'tiny', 'cifar10_stage', 'cifar10_teacher'} <= set(configs)
  assert main.resolve_config_arg('quickstart:method=pd') == configs['quickstart'] + ':method=pd'
  assert main.resolve_config_arg('configs/tiny.py') == 'configs/tiny.py'  # a path stays a path
  spec = importlib.util.spec_from_file_location('quickstart_config', configs['quickstart'])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  pd, sferd = module.get_config('method=pd'), module.get_config()
  assert not pd.sferd.attention_guidance.enabled and pd.phases == ('teacher', 'distill', 'consistency', 'evaluate')
  assert pd.evaluate.semantic == (False,) and sferd.sferd.attention_guidance.enabled
  # The installed console script is the same command line.
  sferd_script = os.path.join(os.path.dirname(sys.executable), 'sferd')
  if not os.path.exists(sferd_script):
    pytest.skip('the sferd console script is not installed in this environment')
  result = subprocess.run([sferd_script, '--config=tinny', f'--workdir={tmp_path}'], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == errors.USER_ERROR_EXIT_CODE and 'the shipped ones are' in result.stderr


def test_a_failed_sample_leaves_no_folder(tmp_path):
  result = _main('--config=tiny', f'--workdir={tmp_path / "run"}', '--mode=sample')
  assert result.returncode == errors.USER_ERROR_EXIT_CODE and 'no exported model found' in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_no_line_about_a_tpu_the_machine_does_not_have(tmp_path):
  # JAX looks for every platform when JAX_PLATFORMS is unset and logs at INFO that libtpu is missing. The batch of
  # 6 does not split over the 4 devices, an error raised once JAX has started its backends.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run([sys.executable, '-m', 'sferd_jax.main', '--config=tiny', f'--workdir={tmp_path}',
                           '--config.teacher.batch_size=6'], cwd=tiny.ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == errors.USER_ERROR_EXIT_CODE and 'divisible' in result.stderr, result.stderr[-2000:]
  assert 'libtpu' not in result.stderr


def test_missing_dataset_names_the_commands_to_prepare_it(tmp_path):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.data.name=cifar10',
                 '--config.model.image_size=32', '--config.model.channels=3', '--config.model.attn_resolutions=(16,)',
                 f'--config.data.data_dir={tmp_path / "tfds"}')
  assert result.returncode == errors.USER_ERROR_EXIT_CODE, result.stderr[-3000:]
  assert 'download_and_prepare' in result.stderr and 'Traceback' not in result.stderr


def test_bucket_workdir_without_its_packages_says_what_to_install(tmp_path):
  # This venv has neither gcsfs nor google-cloud-storage (test_buckets.py fakes them); the run stops before any
  # training, in one line, and writes nothing (no local folder named 'gs:').
  result = _main(f'--config={tiny.ROOT}/configs/tiny.py', '--workdir=gs://bucket/run', cwd=tmp_path)
  assert result.returncode == errors.USER_ERROR_EXIT_CODE, result.stderr[-3000:]
  assert 'pip install gcsfs google-cloud-storage' in result.stderr and 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path)


def test_optional_keys_can_be_set_from_the_command_line(tmp_path):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', '--mode=distill',
                 '--config.distill.teacher=/no/such/teacher')
  assert result.returncode == errors.USER_ERROR_EXIT_CODE, result.stderr[-2000:]
  assert 'no teacher to distil at /no/such/teacher' in result.stderr, result.stderr[-2000:]
