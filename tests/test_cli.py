"""The command line as a user meets it: a run, the sample mode, and bad input ending in one clear message."""

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


def test_unknown_config_key_is_refused(tmp_path):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.model.chanels=3')
  assert result.returncode != 0 and 'chanels' in result.stderr


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
