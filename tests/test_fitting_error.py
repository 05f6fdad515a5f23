"""Fitting-error analysis: bias/variance, Pearson and mass-map maths by hand, and the analyze mode on the tiny run."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from sferd_jax import errors
from sferd_jax.evaluation import fitting_error
from sferd_jax.sferd import guided_teacher
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


def test_derangements_are_seeded_and_fix_no_image():
  assert [fitting_error.num_derangements(n) for n in range(7)] == [1, 0, 1, 2, 9, 44, 265]
  rows = fitting_error.derangements(6, 50, (0, 7))  # 265 > 50: sampled
  assert rows.shape == (50, 6)
  assert all(sorted(row) == list(range(6)) for row in rows) and not np.any(rows == np.arange(6))
  np.testing.assert_array_equal(rows, fitting_error.derangements(6, 50, (0, 7)))
  assert len({tuple(row) for row in rows}) > 30
  assert not np.array_equal(rows, fitting_error.derangements(6, 50, (1, 7)))
  # Few derangements: all of them, once each (an exact null), whatever the count asked for.
  rows = fitting_error.derangements(4, 200, 0)
  assert rows.shape == (9, 4) and len({tuple(row) for row in rows}) == 9 and not np.any(rows == np.arange(4))
  assert fitting_error.derangements(5, 44, 0).shape == (44, 5) and fitting_error.derangements(5, 43, 0).shape == (43, 5)
  np.testing.assert_array_equal(fitting_error.derangements(2, 3, 0), [[1, 0]])
  with pytest.raises(ValueError, match='2 images'):
    fitting_error.derangements(1, 3, 0)


def test_permutation_null_when_mass_is_variance():
  rng = np.random.default_rng(3)
  variance = rng.gamma(2.0, size=(12, 8, 8))
  perms = fitting_error.derangements(12, 200, 0)
  null = fitting_error.permutation_null(variance, variance.copy(), perms)
  assert math.isclose(null.observed, 1.0)
  assert null.null.shape == (200,) and np.all(null.null < 1.0)
  assert math.isclose(null.p_value, 1 / 201)  # nothing in the null reaches the observed 1
  assert null.null_low <= null.null_mean <= null.null_high < 1.0
  # Each null value is the same statistic with mass map perm[i] against variance map i.
  r0 = np.mean([np.corrcoef(variance[i].ravel(), variance[perms[0, i]].ravel())[0, 1] for i in range(12)])
  assert math.isclose(null.null[0], r0, rel_tol=1e-10)
  mass = rng.normal(size=variance.shape)
  matrix = fitting_error.correlation_matrix(variance, mass)
  np.testing.assert_allclose(np.diag(matrix), fitting_error.pearson(variance, mass, axis=(1, 2)), rtol=1e-10)
  assert math.isclose(matrix[2, 5], np.corrcoef(variance[2].ravel(), mass[5].ravel())[0, 1], rel_tol=1e-10)
  with pytest.raises(ValueError, match='permutations'):
    fitting_error.permutation_null(variance, variance, perms[:, :5])


def test_permutation_null_of_independent_maps_is_centred():
  rng = np.random.default_rng(4)
  variance, mass = rng.normal(size=(2, 20, 16, 16))
  null = fitting_error.permutation_null(variance, mass, fitting_error.derangements(20, 200, 1))
  assert abs(null.null_mean) < 0.01 and null.null_low < 0 < null.null_high
  assert 0.0 < null.p_value <= 1.0
  # A shared structure in every map (a bright centre) survives the derangement: the null is not centred at 0.
  centre = np.zeros((16, 16))
  centre[4:12, 4:12] = 3.0
  null = fitting_error.permutation_null(variance + centre, mass + centre, fitting_error.derangements(20, 200, 1))
  assert null.null_mean > 0.5 and null.p_value > 0.05
  constant = fitting_error.permutation_null(np.ones((3, 4, 4)), mass[:3, :4, :4], fitting_error.derangements(3, 5, 0))
  assert all(math.isnan(v) for v in (constant.observed, constant.null_mean, constant.p_value))


def test_partial_correlation_against_least_squares():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(2, 4, 5, 5))
  b += 0.5 * a
  fg = rng.random(size=(4, 5, 5)) > 0.5
  fg[3] = True  # one image all foreground: [1, fg] is rank-deficient, the fit is the mean
  want = []
  for i in range(4):
    design = np.stack([np.ones(25), fg[i].ravel()], axis=1).astype(np.float64)
    residuals = [y - design @ np.linalg.lstsq(design, y, rcond=None)[0] for y in (a[i].ravel(), b[i].ravel())]
    want.append(np.corrcoef(*residuals)[0, 1])
  np.testing.assert_allclose(fitting_error.partial_correlation(a, b, fg), want, rtol=1e-10)
  with pytest.raises(ValueError, match='same shape'):
    fitting_error.partial_correlation(a, b, fg[:2])


def test_partial_correlation_removes_the_foreground():
  rng = np.random.default_rng(6)
  x0 = -np.ones((16, 12, 12, 1))
  x0[:, 3:9, 2:10] = rng.uniform(-0.5, 1.0, size=(16, 6, 8, 1))
  x0[:, 0, 0] = -0.95  # not above -1 + 0.1: background
  fg = fitting_error.foreground_mask(x0)
  assert fg.shape == (16, 12, 12) and fg.sum() == 16 * 48
  # Both maps track the object and nothing else they share: correlated, but not given the foreground.
  variance = 0.1 + 2.0 * fg + 0.3 * rng.random(size=fg.shape)
  mass = 0.5 + 3.0 * fg + 0.4 * rng.random(size=fg.shape)
  assert np.mean(fitting_error.pearson(variance, mass, axis=(1, 2))) > 0.8
  assert abs(np.mean(fitting_error.partial_correlation(variance, mass, fg))) < 0.05
  # A shared signal beyond the foreground survives.
  shared = rng.normal(size=fg.shape)
  assert np.mean(fitting_error.partial_correlation(variance + shared, mass + shared, fg)) > 0.8
  # A map that is a function of the foreground alone leaves constant residuals: NaN, skipped by the analysis.
  partial = fitting_error.partial_correlation(0.1 + 2.0 * fg, mass, fg)
  assert np.isnan(partial).all()
  _, stats = fitting_error.level_statistics(x0, x0 + rng.normal(size=(3,) + x0.shape) * (1 + fg[..., None]),
                                            {'a': mass, 'b': 0.1 + 2.0 * fg})
  assert math.isfinite(stats['partial_correlation']['a']) and math.isnan(stats['partial_correlation']['b'])
  assert math.isclose(stats['foreground_fraction'], 48 / 144)
  assert all(math.isnan(v) for v in stats['correlation_null']['a'].values())  # no permutations given


def test_risky_error_ratio_by_hand():
  x0 = np.zeros((1, 2, 2, 1))
  x_hats = np.ones((2, 1, 2, 2, 1))   # outside: bias 1, variance 0 -> error 1
  x_hats[:, 0, 0, 0, 0] = [2.0, -2.0]  # inside: bias 0, variance 4 -> error 4
  mask = np.array([[[True, False], [False, False]]])
  assert fitting_error.risky_error_ratio(x0, x_hats, mask) == 4.0
  assert fitting_error.risky_errors(x0, x_hats, mask) == (4.0, 1.0)
  assert fitting_error.risky_error_ratio(x0, x_hats, mask[..., None].astype(np.float32)) == 4.0
  assert math.isclose(fitting_error.risky_error_ratio(x0, x_hats, ~mask), 1.0 / 4.0)
  assert math.isnan(fitting_error.risky_error_ratio(x0, x_hats, np.zeros_like(mask)))
  assert math.isnan(fitting_error.risky_error_ratio(x0, x_hats, np.ones_like(mask)))
  # Channels: the per-pixel error is their mean.
  x0c, x_hatsc = np.zeros((1, 1, 2, 2)), np.zeros((3, 1, 1, 2, 2))
  x_hatsc[:, 0, 0, 0] = [[2.0, 0.0]] * 3  # pixel 0: errors 4 and 0 -> 2;  pixel 1: 0
  x_hatsc[:, 0, 0, 1] = [[1.0, 1.0]] * 3  # pixel 1: 1
  assert fitting_error.risky_error_ratio(x0c, x_hatsc, np.array([[[True, False]]])) == 2.0
  with pytest.raises(ValueError, match='mask'):
    fitting_error.risky_error_ratio(x0, x_hats, mask[:, :1])
  _, stats = fitting_error.risky_statistics(x0, x_hats, np.array([[[1.5, 1.0], [0.2, 0.9]]]), 1.0)
  assert stats == dict(risky_error_ratio=4.0, risky_fraction=0.25, risky_mse_inside=4.0, risky_mse_outside=1.0)


def test_block_ranking():
  assert fitting_error.block_ranking({'a': 0.1, 'b': float('nan'), 'c': 0.5, 'd': 0.1}) == ['c', 'a', 'd', 'b']
  assert fitting_error.block_ranking({}) == []


def test_maps_plot_names_are_unique_per_level():
  names = [fitting_error.maps_plot_name(i, t) for i, t in enumerate((0.301, 0.304, 0.5, 0.5))]
  assert len(set(names)) == 4 and names[0] == 'maps_0_t0.301.png'


def _copy_exports(src, dst):
  """The run's exported models without its checkpoints: a workdir of our own to write analyze/ into."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('checkpoints'))
  return str(dst)


def test_run_analysis_writes_plots_and_summary(tiny_run, tmp_path, monkeypatch):
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
    # The controls.
    assert level['block_ranking'][0] == level['best_block'] and sorted(level['block_ranking']) == sorted(names)
    assert [level['correlation'][b] for b in level['block_ranking']] == sorted(level['correlation'].values(),
                                                                              reverse=True)
    assert set(level['correlation_null']) == set(level['partial_correlation']) == set(names)
    for null in level['correlation_null'].values():
      assert set(null) == {'mean', 'low', 'high', 'p_value'}
      assert 1 / 45 <= null['p_value'] <= 1 and null['low'] <= null['mean'] <= null['high']
    assert all(r is None or -1 <= r <= 1 for r in level['partial_correlation'].values())
    assert 0 < level['foreground_fraction'] <= 1 and 0 <= level['risky_fraction'] <= 1
    for key in ('risky_error_ratio', 'risky_mse_inside', 'risky_mse_outside'):
      assert key in level and (level[key] is None or level[key] > 0)
    if level['risky_error_ratio'] is not None:
      assert math.isclose(level['risky_error_ratio'], level['risky_mse_inside'] / level['risky_mse_outside'])
  controls = summary['controls']
  # 5 images have 44 derangements, fewer than NULL_PERMUTATIONS = 200: all of them, an exact null.
  assert controls['num_permutations'] == 44 and controls['permutations_exhaustive']
  assert math.isclose(controls['foreground_threshold'], -0.9)
  assert controls['risky_mask']['model'] == summary['model'] and controls['risky_mask']['threshold'] == 1.0
  assert controls['risky_mask']['block'] == guided_teacher.guidance_block(config.model,
                                                                          config.sferd.attention_guidance)
  assert summary['levels'][0]['logsnr'] > summary['levels'][1]['logsnr']  # later t, more noise
  assert summary['best']['block'] in names and 'each image' in summary['correlation_definition']
  for name in summary['plots']:
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert set(summary['plots']) == {'bias_variance.png', 'correlation.png', 'maps_0_t0.3.png', 'maps_1_t0.7.png'}
  with np.load(os.path.join(out, 'maps.npz')) as maps:
    assert maps['variance_t1'].shape == (5, 8, 8) and maps['mass_t0/mid_attn'].shape == (5, 8, 8)
    assert np.isfinite(maps['bias_t0']).all()
    for i, level in enumerate(summary['levels']):
      assert math.isclose(maps[f'risky_t{i}'].mean(dtype=np.float64), level['risky_fraction'])
      np.testing.assert_array_equal(maps[f'risky_t{i}'],
                                    maps[f"mass_t{i}/{controls['risky_mask']['block']}"] > 1.0)
    assert maps['foreground'].shape == (5, 8, 8)

  # The same analysis of a named model (the teacher), by a path relative to the workdir; two levels that print
  # alike at 2 decimals get a figure each.
  config = tiny.load_config(**{'analyze.model': 'teacher', 'analyze.num_images': 2, 'analyze.num_noises': 2,
                               'analyze.times': (0.501, 0.504)})
  summary = fitting_error.run_analysis(config, workdir)
  assert summary['model'].endswith(os.path.join('teacher', 'model'))
  maps = [name for name in summary['plots'] if name.startswith('maps_')]
  assert len(set(maps)) == 2 and all(os.path.exists(os.path.join(out, name)) for name in maps)
  with np.load(os.path.join(out, 'maps.npz')) as arrays:
    teacher_risky = [arrays[f'risky_t{i}'] for i in range(2)]

  # The risky mask from a named mask model: the model itself gives the same numbers (the same run, seeded) ...
  same = fitting_error.run_analysis(config, workdir, mask_model_path='teacher')
  assert same['levels'] == summary['levels'] and same['controls'] == summary['controls']
  assert summary['controls']['num_permutations'] == 1  # 2 images: the swap; p-values 1/2 or 1, not 1/201
  assert all(null['p_value'] in (0.5, 1.0) for lv in summary['levels'] for null in lv['correlation_null'].values())
  # ... and a student measured inside the teacher's regions has the teacher's masks.
  config = tiny.load_config(**{'analyze.num_images': 2, 'analyze.num_noises': 2, 'analyze.times': (0.501, 0.504)})
  student = fitting_error.run_analysis(config, workdir, mask_model_path='teacher')
  assert student['model'] != summary['model'] and student['controls']['risky_mask']['model'] == summary['model']
  assert [lv['logsnr'] for lv in student['levels']] == [lv['logsnr'] for lv in summary['levels']]
  with np.load(os.path.join(out, 'maps.npz')) as arrays:
    for i in range(2):
      np.testing.assert_array_equal(arrays[f'risky_t{i}'], teacher_risky[i])

  # One image: no derangement, no null. A guidance block the model lacks: no risky mask, the rest still runs.
  monkeypatch.setattr(guided_teacher, 'guidance_block', lambda *args: 'no_such_attn')
  config = tiny.load_config(**{'analyze.num_images': 1, 'analyze.num_noises': 2, 'analyze.times': (0.5,)})
  single = fitting_error.run_analysis(config, workdir)
  assert single['controls']['num_permutations'] is None and single['controls']['risky_mask']['block'] is None
  (level,) = single['levels']
  assert all(v is None for null in level['correlation_null'].values() for v in null.values())
  assert level['risky_error_ratio'] is None and level['risky_fraction'] is None
  assert level['correlation'][level['best_block']] is not None
  with pytest.raises(errors.ConfigError, match='no_such_attn'):
    fitting_error.run_analysis(config, workdir, mask_model_path='teacher')


def test_run_analysis_errors(tmp_path):
  with pytest.raises(errors.CheckpointError, match='no exported model'):
    fitting_error.run_analysis(tiny.load_config(), str(tmp_path))
  with pytest.raises(errors.ConfigError, match='num_noises'):
    fitting_error.run_analysis(tiny.load_config(**{'analyze.num_noises': 1}), str(tmp_path))
  with pytest.raises(errors.ConfigError, match='times'):
    fitting_error.run_analysis(tiny.load_config(**{'analyze.times': (0.0, 0.5)}), str(tmp_path))
