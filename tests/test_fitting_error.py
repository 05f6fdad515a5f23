"""Fitting-error analysis: bias/variance, Pearson and mass-map maths by hand, and the analyze mode on the tiny run."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from sferd_jax import config as config_lib
from sferd_jax.evaluation import fitting_error
from sferd_jax.sferd import guided_teacher
from sferd_jax.training import checkpointing
import tiny


def test_bias_variance_against_numpy():
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(3, 4, 5, 2))
  x_hats = x0 + 0.3 + rng.normal(size=(6,) + x0.shape)
  bv = fitting_error.bias_variance(x0, x_hats)
  np.testing.assert_allclose(bv.bias, (x_hats.mean(0) - x0).mean(-1))
  np.testing.assert_allclose(bv.variance, x_hats.var(0).mean(-1))
  assert bv.bias.shape == bv.variance.shape == (3, 4, 5)
  # Population variance: bias^2 + variance is the mean squared error, exactly.
  assert math.isclose(bv.bias_sq + bv.variance_total, np.mean((x_hats - x0)**2), rel_tol=1e-12)
  assert math.isclose(bv.bias_sq, np.mean((x_hats.mean(0) - x0)**2), rel_tol=1e-12)


def test_bias_variance_of_hand_built_predictions():
  x0 = np.zeros((1, 2, 2, 1))
  # Pixel (0, 0): predictions 1 and 3 (bias 2, variance 1); elsewhere exact.
  x_hats = np.zeros((2, 1, 2, 2, 1))
  x_hats[0, 0, 0, 0, 0], x_hats[1, 0, 0, 0, 0] = 1.0, 3.0
  bv = fitting_error.bias_variance(x0, x_hats)
  np.testing.assert_array_equal(bv.bias[0], [[2.0, 0.0], [0.0, 0.0]])
  np.testing.assert_array_equal(bv.variance[0], [[1.0, 0.0], [0.0, 0.0]])
  assert bv.bias_sq == 1.0 and bv.variance_total == 0.25
  with pytest.raises(ValueError, match='x_hats'):
    fitting_error.bias_variance(x0, np.zeros((2, 1, 2, 3, 1)))


def test_pearson_against_corrcoef():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(4, 5, 6))
  b = 0.5 * a + rng.normal(size=a.shape)
  assert math.isclose(float(fitting_error.pearson(a, b)), np.corrcoef(a.ravel(), b.ravel())[0, 1], rel_tol=1e-12)
  per_image = fitting_error.pearson(a, b, axis=(1, 2))
  np.testing.assert_allclose(per_image, [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(4)])
  assert math.isclose(float(fitting_error.pearson(a, -2 * a + 1)), -1.0)
  b[2] = 7.0  # a constant map has no correlation: NaN, not a division warning.
  assert np.isnan(fitting_error.pearson(a, b, axis=(1, 2))[2])
  with pytest.raises(ValueError, match='same shape'):
    fitting_error.pearson(a, b[:2])


def test_mass_maps_of_one_hot_attention():
  batch, heads, side, size = 2, 2, 4, 8
  tokens = side * side
  probs = np.zeros((batch, heads, tokens, tokens), np.float32)
  probs[0, :, :, 5] = 1.0            # image 0: every query of both heads attends to key 5 = grid (1, 1)
  probs[1, 0, :, 2] = 1.0            # image 1: head 0 -> key 2 = (0, 2), head 1 -> key 15 = (3, 3)
  probs[1, 1, :, 15] = 1.0
  maps = np.asarray(jax.jit(fitting_error.attention_mass_maps, static_argnums=1)(probs, (size, size)))
  assert maps.shape == (batch, size, size)
  want0 = np.zeros((size, size))
  want0[2:4, 2:4] = tokens           # all T queries' mass, nearest-upsampled by 2
  np.testing.assert_array_equal(maps[0], want0)
  want1 = np.zeros((size, size))
  want1[0:2, 4:6] = want1[6:8, 6:8] = tokens / 2  # the mean over heads halves each
  np.testing.assert_array_equal(maps[1], want1)
  # Uniform attention: every key draws T_query / T_key = 1.
  uniform = np.full((1, 1, tokens, tokens), 1.0 / tokens, np.float32)
  np.testing.assert_allclose(fitting_error.attention_mass_maps(uniform, size), np.ones((1, size, size)), rtol=1e-6)
  with pytest.raises(ValueError, match='square grid'):
    fitting_error.attention_mass_maps(np.zeros((1, 1, 6, 6)), 8)


def test_one_attention_mass_for_the_maps_and_the_risky_mask():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, 16, 16)) * 3
  probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  mass = np.asarray(guided_teacher.attention_mass(probs))
  np.testing.assert_allclose(mass, probs.mean(axis=1).sum(axis=1), rtol=1e-6)
  np.testing.assert_allclose(mass.mean(axis=1), 1.0, rtol=1e-6)  # T_query / T_key for self-attention
  maps = np.asarray(fitting_error.attention_mass_maps(probs, 8))
  np.testing.assert_array_equal(maps, np.repeat(np.repeat(mass.reshape(2, 4, 4), 2, axis=1), 2, axis=2))
  # The risky mask is the mass map above its threshold, pixel for pixel.
  for threshold in (0.8, 1.0, 1.3):
    mask = np.asarray(guided_teacher.risky_mask(probs, image_hw=8, threshold=threshold))[..., 0]
    np.testing.assert_array_equal(mask, (maps > threshold).astype(np.float32))
  with pytest.raises(AssertionError):
    guided_teacher.attention_mass(probs[0])


def test_maps_plot_names_are_unique_per_level():
  names = [fitting_error.maps_plot_name(i, t) for i, t in enumerate((0.301, 0.304, 0.5, 0.5))]
  assert len(set(names)) == 4 and names[0] == 'maps_0_t0.301.png'


def _copy_exports(src, dst):
  """The run's exported models without its checkpoints: a workdir of our own to write analyze/ into."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('checkpoints'))
  return str(dst)


def test_run_analysis_writes_plots_and_summary(tiny_run, tmp_path):
  workdir = _copy_exports(tiny_run[0], tmp_path / 'run')
  config = tiny.load_config(**{'analyze.num_images': 5, 'analyze.num_noises': 3, 'analyze.times': (0.3, 0.7)})
  summary = fitting_error.run_analysis(config, workdir)
  out = os.path.join(workdir, 'analyze')
  with open(os.path.join(out, 'summary.json')) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary['model'].endswith(os.path.join('distill', 'stage_2', 'model'))  # None = the last model
  assert summary['num_images'] == 5 and summary['num_noises'] == 3
  names = [b['name'] for b in summary['blocks']]
  assert names == ['enc4_0_attn', 'mid_attn', 'dec4_0_attn', 'dec4_1_attn']
  assert [lv['t'] for lv in summary['levels']] == [0.3, 0.7]
  for level in summary['levels']:
    assert set(level) >= {'t', 'logsnr', 'bias_sq', 'variance', 'mse', 'correlation', 'correlation_pooled',
                          'best_block'}
    assert level['bias_sq'] > 0 and level['variance'] > 0 and math.isfinite(level['logsnr'])
    assert math.isclose(level['mse'], level['bias_sq'] + level['variance'])
    assert set(level['correlation']) == set(level['correlation_pooled']) == set(names)
    assert all(-1 <= r <= 1 for r in list(level['correlation'].values()) + list(level['correlation_pooled'].values()))
    assert level['best_block'] == max(level['correlation'], key=level['correlation'].get)
  assert summary['levels'][0]['logsnr'] > summary['levels'][1]['logsnr']  # later t, more noise
  assert summary['best']['block'] in names and 'each image' in summary['correlation_definition']
  for name in summary['plots']:
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert set(summary['plots']) == {'bias_variance.png', 'correlation.png', 'maps_0_t0.3.png', 'maps_1_t0.7.png'}
  with np.load(os.path.join(out, 'maps.npz')) as maps:
    assert maps['variance_t1'].shape == (5, 8, 8) and maps['mass_t0/mid_attn'].shape == (5, 8, 8)
    assert np.isfinite(maps['bias_t0']).all()

  # The same analysis of a named model (the teacher), by a path relative to the workdir; two levels that print
  # alike at 2 decimals get a figure each.
  config = tiny.load_config(**{'analyze.model': 'teacher', 'analyze.num_images': 2, 'analyze.num_noises': 2,
                               'analyze.times': (0.501, 0.504)})
  summary = fitting_error.run_analysis(config, workdir)
  assert summary['model'].endswith(os.path.join('teacher', 'model'))
  maps = [name for name in summary['plots'] if name.startswith('maps_')]
  assert len(set(maps)) == 2 and all(os.path.exists(os.path.join(out, name)) for name in maps)


def test_run_analysis_errors(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='no exported model'):
    fitting_error.run_analysis(tiny.load_config(), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match='num_noises'):
    fitting_error.run_analysis(tiny.load_config(**{'analyze.num_noises': 1}), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match='times'):
    fitting_error.run_analysis(tiny.load_config(**{'analyze.times': (0.0, 0.5)}), str(tmp_path))
