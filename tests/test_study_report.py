"""The study report: t-intervals and paired statistics by hand, the summary of synthetic rows, table, plot, files."""

import json
import math
import os

import numpy as np
import pytest
import scipy.stats

from sferd_jax.evaluation import study_report

ARMS = ('pd', 'pd+guidance', 'pd+predictor', 'sferd')
# FID per (arm, seed) at 1 step; 2 and 4 steps add 2 and 4. Seed 1 is harder for every arm (paired noise).
FID_1STEP = {
    'pd': {0: 20.0, 1: 24.0, 2: 21.0},
    'pd+guidance': {0: 17.0, 1: 20.5, 2: 18.0},
    'pd+predictor': {0: 18.0, 1: 22.5, 2: 19.5},
    'sferd': {0: 14.0, 1: 17.0, 2: 15.5},
}


def _row(arm, seed, num_steps, fid, *, sample_seed=0, kid=None, extractor='classifier/test'):
  return dict(arm=arm, seed=seed, num_steps=num_steps, sample_seed=sample_seed, fid=fid,
              kid_mean=0.001 * fid if kid is None else kid, nn_dist=4.0, nn_dist_real=3.0,
              code_sensitivity=0.3 if 'predictor' in arm or arm == 'sferd' else None, extractor=extractor,
              inception_fid=None)


def _study_rows():
  return [_row(arm, seed, steps, fid + (steps if steps > 1 else 0))
          for arm in ARMS for seed, fid in FID_1STEP[arm].items() for steps in (4, 2, 1)]


def _t_by_hand(x, confidence):
  x = np.asarray(x, np.float64)
  n = len(x)
  mean = x.sum() / n
  std = math.sqrt(((x - mean)**2).sum() / (n - 1))
  half = scipy.stats.t.ppf(1 - (1 - confidence) / 2, df=n - 1) * std / math.sqrt(n)
  return mean, std, mean - half, mean + half


@pytest.mark.parametrize('confidence', [0.95, 0.9])
def test_mean_interval_against_scipy_t(confidence):
  sample = [1.0, 2.5, 3.0, 4.5]
  mean, std, low, high = _t_by_hand(sample, confidence)
  got = study_report.mean_interval(sample, confidence=confidence)
  assert got['n'] == 4 and got['excluded'] == 0
  for key, want in dict(mean=mean, std=std, low=low, high=high).items():
    assert math.isclose(got[key], want, rel_tol=1e-12), key
  # For 0.95: t_{0.975, 3} = 3.182, a known table value.
  if confidence == 0.95:
    assert math.isclose((high - low) / 2 / (std / 2), 3.1824463, rel_tol=1e-6)
  # scipy's own interval agrees.
  ref = scipy.stats.t.interval(confidence, 3, loc=mean, scale=scipy.stats.sem(sample))
  np.testing.assert_allclose([got['low'], got['high']], ref, rtol=1e-12)


def test_mean_interval_excludes_missing_values_and_counts_them():
  got = study_report.mean_interval([1.0, None, 2.5, float('nan'), 3.0, np.float32('nan'), 4.5])
  want = study_report.mean_interval([1.0, 2.5, 3.0, 4.5])
  assert got['excluded'] == 3 and got['n'] == 4
  assert {k: got[k] for k in want if k != 'excluded'} == {k: want[k] for k in want if k != 'excluded'}


def test_mean_interval_one_value_has_no_interval():
  got = study_report.mean_interval([7.5, None])
  assert got == dict(mean=7.5, low=None, high=None, n=1, std=None, excluded=1)
  assert study_report.mean_interval([])['mean'] is None
  assert study_report.format_interval(got) == '7.50 (n=1)'
  with pytest.raises(ValueError):
    study_report.mean_interval([1.0, 2.0], confidence=1.0)


def test_paired_ratio_of_proportional_values_is_that_ratio_with_zero_width():
  den = {0: 20.0, 1: 31.0, 2: 17.5, 3: 44.0}
  num = {s: 0.625 * v for s, v in den.items()}
  got = study_report.paired_ratio(num, den)
  assert got['n'] == 4
  for key in ('ratio', 'low', 'high'):
    assert math.isclose(got[key], 0.625, rel_tol=1e-12), key
  assert got['per_seed'] == {s: 0.625 for s in den}


def test_paired_ratio_is_geometric_with_a_log_space_interval():
  num, den = [12.0, 15.0, 11.0], [20.0, 21.0, 22.0]
  logs = np.log(np.array(num) / np.array(den))
  mean, _, low, high = _t_by_hand(logs, 0.95)
  got = study_report.paired_ratio(num, den)  # Sequences: paired by position.
  assert math.isclose(got['ratio'], math.exp(mean), rel_tol=1e-12)
  assert math.isclose(got['ratio'], float(np.prod(np.array(num) / np.array(den))**(1 / 3)), rel_tol=1e-12)
  assert math.isclose(got['low'], math.exp(low), rel_tol=1e-12)
  assert math.isclose(got['high'], math.exp(high), rel_tol=1e-12)
  assert got['low'] < got['ratio'] < got['high']
  one = study_report.paired_ratio({0: 1.0}, {0: 2.0})
  assert one['ratio'] == 0.5 and one['low'] is None and one['high'] is None
  with pytest.raises(ValueError):
    study_report.paired_ratio([1.0, 2.0], [1.0])


def test_paired_difference_pairs_the_seeds_both_have():
  a = {0: 10.0, 1: 12.0, 2: 11.0, 3: None}
  b = {0: 8.0, 1: 9.0, 3: 5.0, 4: 6.0}
  got = study_report.paired_difference(a, b)
  assert got['per_seed'] == {0: 2.0, 1: 3.0}
  mean, std, low, high = _t_by_hand([2.0, 3.0], 0.95)
  assert got['n'] == 2 and got['mean'] == mean
  assert math.isclose(got['low'], low) and math.isclose(got['high'], high) and math.isclose(got['std'], std)
  assert study_report.paired_difference({}, {0: 1.0})['mean'] is None


def test_summary_cells_and_gains_arithmetic():
  summary = study_report.summarize(_study_rows())
  assert summary['arms'] == list(ARMS) and summary['steps'] == [4, 2, 1]
  assert summary['extractor'] == 'classifier/test'
  cells = {(c['arm'], c['num_steps']): c for c in summary['cells']}
  for arm in ARMS:
    for steps in (4, 2, 1):
      values = [v + (steps if steps > 1 else 0) for v in FID_1STEP[arm].values()]
      mean, _, low, high = _t_by_hand(values, 0.95)
      cell = cells[arm, steps]
      assert cell['n'] == 3 and cell['seeds'] == [0, 1, 2]
      assert math.isclose(cell['mean'], mean) and math.isclose(cell['low'], low) and math.isclose(cell['high'], high)

  gains = {g['num_steps']: g for g in summary['gains']}
  pd, g, p, s = (np.array(list(FID_1STEP[a].values())) for a in ARMS)
  for steps in (4, 2, 1):  # The constant step offset cancels in every difference.
    gain = gains[steps]
    for key, want in dict(guidance=pd - g, predictor=pd - p, both=pd - s, interaction=g + p - pd - s).items():
      mean, _, low, high = _t_by_hand(want, 0.95)
      assert math.isclose(gain[key]['mean'], mean), key
      assert math.isclose(gain[key]['low'], low) and math.isclose(gain[key]['high'], high), key
      np.testing.assert_allclose(list(gain[key]['per_seed'].values()), want)
      assert list(gain[key]['per_seed']) == ['0', '1', '2']
    assert math.isclose(gain['interaction']['mean'],
                        gain['both']['mean'] - gain['guidance']['mean'] - gain['predictor']['mean'])
  # Numbers by hand: guidance gains 3, 3.5, 3 -> 19/6; predictor 2, 1.5, 1.5 -> 5/3; both 6, 7, 5.5 -> 37/6.
  assert math.isclose(gains[1]['guidance']['mean'], 19 / 6)
  assert math.isclose(gains[1]['predictor']['mean'], 5 / 3)
  assert math.isclose(gains[1]['both']['mean'], 37 / 6)
  assert math.isclose(gains[1]['interaction']['mean'], 37 / 6 - 19 / 6 - 5 / 3)

  r = summary['ratio_1step']
  want = np.log(s / pd)
  mean, _, low, high = _t_by_hand(want, 0.95)
  assert r['n'] == 3 and math.isclose(r['ratio'], math.exp(mean))
  assert math.isclose(r['low'], math.exp(low)) and math.isclose(r['high'], math.exp(high))
  assert [x['num_steps'] for x in summary['ratios']] == [4, 2, 1]
  assert summary['ratios'][-1]['ratio'] == r['ratio']
  # JSON-able, and unchanged by a round trip.
  assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_missing_seeds_and_arms_do_not_crash():
  rows = [r for r in _study_rows() if not (r['arm'] == 'sferd' and r['seed'] == 2)]
  rows = [r for r in rows if not (r['arm'] == 'pd+predictor' and r['num_steps'] == 4)]
  rows.append(_row('sferd_bf16', 0, 1, 14.2))
  rows.append(_row('pd_more_updates', 5, 1, 19.0))  # A seed no other arm has.
  summary = study_report.summarize(rows)
  assert summary['arms'] == ['pd', 'pd_more_updates', 'pd+guidance', 'pd+predictor', 'sferd', 'sferd_bf16']
  cells = {(c['arm'], c['num_steps']): c for c in summary['cells']}
  assert cells['sferd', 1]['n'] == 2 and cells['sferd', 1]['seeds'] == [0, 1]
  assert cells['sferd_bf16', 1] == dict(arm='sferd_bf16', num_steps=1, mean=14.2, low=None, high=None, n=1,
                                        std=None, excluded=0, seeds=[0])
  assert ('pd+predictor', 4) not in cells
  r = summary['ratio_1step']
  assert r['n'] == 2 and list(r['per_seed']) == ['0', '1']
  assert math.isclose(r['per_seed']['0'], 14.0 / 20.0) and math.isclose(r['per_seed']['1'], 17.0 / 24.0)
  gains = {g['num_steps']: g for g in summary['gains']}
  assert gains[1]['guidance']['n'] == 3 and gains[1]['both']['n'] == 2 and gains[1]['interaction']['n'] == 2
  assert gains[4]['predictor']['n'] == 0 and gains[4]['predictor']['mean'] is None
  assert gains[4]['interaction']['n'] == 0
  # No baseline at all: every comparison is empty, nothing raises.
  empty = study_report.summarize([r for r in rows if r['arm'] != 'pd'])
  assert empty['ratio_1step']['ratio'] is None and empty['gains'][0]['both']['n'] == 0
  assert 'R = fid(sferd)' in study_report.markdown_table(empty)
  no_one_step = study_report.summarize([r for r in rows if r['num_steps'] != 1])
  assert no_one_step['ratio_1step'] is None and 'no 1-step rows' in study_report.markdown_table(no_one_step)


def test_sampling_noise_and_smallest_sample_seed_selection():
  rows = [
      _row('pd', 0, 1, 20.0, sample_seed=3, kid=0.010),
      _row('pd', 0, 1, 20.5, sample_seed=7, kid=0.013),
      _row('sferd', 0, 1, 15.0, sample_seed=3, kid=0.020),
      _row('sferd', 0, 1, 14.0, sample_seed=7, kid=0.019),
      _row('sferd', 1, 1, 16.0, sample_seed=3),  # One sample seed: not in the noise figure.
  ]
  summary = study_report.summarize(rows)
  noise = summary['sampling_noise']
  assert set(noise) == {'fid', 'kid_mean'}
  assert noise['fid']['n_models'] == 2 and noise['fid']['n_pairs'] == 2
  assert math.isclose(noise['fid']['mean_abs_diff'], 0.75) and math.isclose(noise['fid']['max_abs_diff'], 1.0)
  assert math.isclose(noise['kid_mean']['mean_abs_diff'], 0.002) and math.isclose(noise['kid_mean']['max_abs_diff'],
                                                                                  0.003)
  # Cells use each model's smallest sample seed (3), not the mean over sample seeds.
  cells = {(c['arm'], c['num_steps']): c for c in summary['cells']}
  assert cells['pd', 1]['mean'] == 20.0
  assert cells['sferd', 1]['mean'] == 15.5 and cells['sferd', 1]['n'] == 2
  # Three sample seeds of one model: all three pairs.
  three = study_report.summarize([_row('pd', 0, 1, v, sample_seed=i) for i, v in enumerate([10.0, 11.0, 13.0])])
  assert three['sampling_noise']['fid'] == dict(mean_abs_diff=2.0, max_abs_diff=3.0, n_models=1, n_pairs=3)
  none = study_report.summarize(_study_rows())['sampling_noise']['fid']
  assert none == dict(mean_abs_diff=None, max_abs_diff=None, n_models=0, n_pairs=0)


def test_rows_that_cannot_be_summarized_raise():
  rows = _study_rows()
  with pytest.raises(ValueError, match='two rows'):
    study_report.summarize(rows + [rows[0]])
  mixed = rows + [_row('pd', 0, 1, 5.0, extractor='inception')]
  with pytest.raises(ValueError, match='extractor'):
    study_report.summarize(mixed)
  only = study_report.summarize(mixed, extractor='inception')
  assert only['extractor'] == 'inception' and [c['arm'] for c in only['cells']] == ['pd']


def test_markdown_table_cells():
  rows = _study_rows() + [_row('sferd_bf16', 0, 1, 14.2)]
  summary = study_report.summarize(rows)
  text = study_report.markdown_table(summary)
  lines = text.splitlines()
  assert '| arm | 4 steps | 2 steps | 1 step | seeds |' in lines
  mean, _, low, high = _t_by_hand(list(FID_1STEP['pd'].values()), 0.95)
  pd_line = next(line for line in lines if line.startswith('| pd |'))
  assert pd_line.endswith(f'| {mean:.2f} [{low:.2f}, {high:.2f}] | 3 |')
  assert f'| {mean + 4:.2f} [{low + 4:.2f}, {high + 4:.2f}] |' in pd_line
  bf16_line = next(line for line in lines if line.startswith('| sferd_bf16 |'))
  assert bf16_line == '| sferd_bf16 | - | - | 14.20 (n=1) | 1 |'
  r = summary['ratio_1step']
  assert f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}], n=3" in text
  assert 'seed 0: 0.700, seed 1: 0.708, seed 2: 0.738' in text
  guidance = next(line for line in lines if line.startswith('| guidance'))
  assert guidance.count(f"{19 / 6:.2f} [") == 3
  assert any(line.startswith('| interaction') for line in lines)
  assert '- fid: no model evaluated at two sample seeds.' in lines


def test_write_report_files(tmp_path):
  rows = _study_rows() + [_row('sferd_bf16', 0, 1, 14.2), _row('pd', 0, 1, 20.4, sample_seed=1)]
  rows[0]['kid_mean'] = np.float32(0.5)  # NumPy scalars and NaN in rows are written as plain JSON.
  rows[1]['nn_dist'] = float('nan')
  summary = study_report.write_report(rows, str(tmp_path / 'report'))
  directory = tmp_path / 'report'
  assert sorted(os.listdir(directory)) == ['fid_vs_steps.png', 'results.json', 'results.md']
  with open(directory / 'results.json') as f:
    saved = json.load(f)
  assert saved['summary'] == summary and len(saved['rows']) == len(rows)
  assert saved['rows'][1]['nn_dist'] is None and isinstance(saved['rows'][0]['kid_mean'], float)
  assert (directory / 'results.md').read_text() == study_report.markdown_table(summary)
  png = (directory / 'fid_vs_steps.png').read_bytes()
  assert len(png) > 1000 and png[:8] == b'\x89PNG\r\n\x1a\n'
  # The plot alone, to another path.
  path = study_report.plot_fid_vs_steps(summary, str(tmp_path / 'alone.png'))
  assert os.path.getsize(path) > 1000
