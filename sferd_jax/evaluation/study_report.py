"""The study's results from its evaluation rows: intervals over distillation seeds, paired ratios and gains, a table,
a plot. NumPy/SciPy/matplotlib only (no JAX), so a finished study can be re-reported anywhere.

The study distils several "arms" ('pd', 'pd+guidance', 'pd+predictor', 'sferd', the controls 'pd_more_updates'
and 'pd+pd_target_predictor', and a one-seed 'sferd_bf16') over several distillation seeds and evaluates each
model at one or more sampling step counts and sample seeds. One row per evaluation:

  {'arm': 'sferd', 'seed': 1, 'num_steps': 1, 'sample_seed': 0, 'fid': 12.3, 'kid_mean': 0.01, ...}

Statistical choices, and why:
  * The unit of replication is the distillation seed: a model is (arm, seed, num_steps). Intervals are Student-t
    with n - 1 degrees of freedom over seeds, since there are few of them (3-5) and a normal interval would be
    too narrow. One seed gives no interval at all (low = high = None): with one value the spread is unknown, and
    inventing one would mislead.
  * Arms are compared *paired by seed* (the same seed shares the teacher's data order, initialisation of the
    student, ...), which removes the seed-to-seed variation the arms have in common. Pairing uses the seeds both
    arms have, so an arm missing a seed costs that seed, not the comparison.
  * Ratios (SFERD's FID over PD's) are multiplicative: the interval is the t-interval of log R, exponentiated,
    and the point estimate is the geometric mean of the per-seed ratios. It is never symmetric around R and
    never crosses 0.
  * Each model's metric is taken at the smallest sample seed evaluated for it, so every cell of the table is one
    draw of sampling noise per model whatever the number of sample seeds evaluated; the sampling noise (the FID
    difference between sample seeds of the same model) is reported separately, to set against the differences
    between arms. Averaging over sample seeds instead would make models with more sample seeds look less noisy.
  * Missing values (None, NaN: e.g. code_sensitivity of an arm without a predictor) are excluded and counted in
    'excluded', never treated as 0.
"""

import collections
import itertools
import json
import math
import os
from collections.abc import Mapping

import numpy as np
import scipy.stats

from sferd_jax import files
from sferd_jax import images as images_lib

# The table's and plot's arm order: the baseline, its compute control, the two halves of SFERD, the capacity
# control, SFERD itself, then its bfloat16 run. Arms not listed follow, in order of first appearance.
ARM_ORDER = ('pd', 'pd_more_updates', 'pd+guidance', 'pd+predictor', 'pd+pd_target_predictor', 'sferd',
             'sferd_bf16')
NOISE_METRICS = ('fid', 'kid_mean')
RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
PLOT_PNG = 'fid_vs_steps.png'


def _is_missing(value):
  return value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value))


def _float_or_none(value):
  return None if value is None else float(value)


# ----------------------------------------------------------------------------------------------------------------
# Intervals.


def mean_interval(values, *, confidence=0.95):
  """The mean of `values` over seeds and its Student-t confidence interval (n - 1 degrees of freedom).

  Why t: the study has a handful of seeds, and with the sample standard deviation standing in for the unknown
  one the normal quantile would give too narrow an interval. None and NaN values are excluded (they mean "not
  measured", not 0) and counted in 'excluded'.

  Returns dict(mean, low, high, n, std, excluded). With n == 1 there is no spread to estimate: std, low and high
  are None (no interval is invented). With n == 0 the mean is None as well. std uses ddof=1.
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')
  values = list(values)
  kept = np.asarray([float(v) for v in values if not _is_missing(v)], np.float64)
  n = int(kept.size)
  out = dict(mean=None, low=None, high=None, n=n, std=None, excluded=len(values) - n)
  if n == 0:
    return out
  mean = float(kept.mean())
  out['mean'] = mean
  if n == 1:
    return out
  std = float(kept.std(ddof=1))
  half = float(scipy.stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
  out.update(std=std, low=mean - half, high=mean + half)
  return out


def _paired_values(*mappings):
  """Seeds every mapping has a value for (None/NaN counts as not having it), sorted, and the values per mapping.

  Mappings are {seed: value}; plain sequences of equal length are paired by position (seed = index).
  """
  if not all(isinstance(m, Mapping) for m in mappings):
    if any(isinstance(m, Mapping) for m in mappings):
      raise TypeError('pass all {seed: value} mappings or all sequences, not a mix')
    lengths = {len(m) for m in mappings}
    if len(lengths) > 1:
      raise ValueError(f'sequences paired by position must have equal lengths, got {sorted(lengths)}')
    mappings = [dict(enumerate(m)) for m in mappings]
  common = set(mappings[0])
  for m in mappings[1:]:
    common &= set(m)
  seeds = sorted(s for s in common if not any(_is_missing(m[s]) for m in mappings))
  return seeds, [[float(m[s]) for s in seeds] for m in mappings]


def _contrast(terms, *, confidence):
  """sum_i coef_i * value_i per seed (over the seeds all terms have), with mean_interval over seeds."""
  seeds, values = _paired_values(*(m for _, m in terms))
  per_seed = {s: float(sum(c * v[i] for (c, _), v in zip(terms, values))) for i, s in enumerate(seeds)}
  out = mean_interval(list(per_seed.values()), confidence=confidence)
  del out['excluded']  # Unpaired seeds are simply not in per_seed.
  out['per_seed'] = per_seed
  return out


def paired_difference(a, b, *, confidence=0.95):
  """The mean over seeds of a - b, paired by seed, with a t-interval on the per-seed differences.

  Why paired: seed-to-seed variation common to both arms cancels in the per-seed difference, so the interval is
  that of the difference, not of two independent means. `a` and `b` are {seed: value} mappings (only the seeds
  both have, with finite values, are used) or equal-length sequences paired by position.

  Returns dict(mean, low, high, n, std, per_seed={seed: a - b}); as mean_interval for n <= 1.
  """
  return _contrast([(1.0, a), (-1.0, b)], confidence=confidence)


def paired_ratio(numerators, denominators, *, confidence=0.95):
  """The ratio num / den paired by seed: geometric mean of the per-seed ratios, interval from log space.

  Why log: ratios are multiplicative (0.5 and 2 are equally far from 1), so the t-interval is taken on log R and
  exponentiated; the interval is asymmetric around the ratio and always positive. Seeds where either value is
  missing or not positive (log undefined) are left out. Inputs as for paired_difference.

  Returns dict(ratio, low, high, n, per_seed={seed: R}); low = high = None when n == 1, ratio None when n == 0.
  """
  seeds, (num, den) = _paired_values(numerators, denominators)
  per_seed = {s: x / y for s, x, y in zip(seeds, num, den) if x > 0 and y > 0}
  log = mean_interval([math.log(r) for r in per_seed.values()], confidence=confidence)
  exp = lambda v: None if v is None else math.exp(v)
  return dict(ratio=exp(log['mean']), low=exp(log['low']), high=exp(log['high']), n=log['n'], per_seed=per_seed)


# ----------------------------------------------------------------------------------------------------------------
# The study's summary.


def _arm_order(arms):
  known = [a for a in ARM_ORDER if a in arms]
  return known + [a for a in arms if a not in ARM_ORDER]


def _models(rows, *, extractor=None):
  """{(arm, seed, num_steps): {sample_seed: row}}, one extractor only. Duplicate evaluations raise."""
  extractors = {r.get('extractor') for r in rows}
  if extractor is not None:
    rows = [r for r in rows if r.get('extractor') == extractor]
  elif len(extractors) > 1:
    # FIDs of different feature extractors are on different scales: averaging them would be meaningless.
    raise ValueError(f'rows of several extractors {sorted(map(str, extractors))}: pass extractor=...')
  models = collections.defaultdict(dict)
  for r in rows:
    key = (r['arm'], int(r['seed']), int(r['num_steps']))
    sample_seed = int(r.get('sample_seed', 0) or 0)
    if sample_seed in models[key]:
      raise ValueError(f'two rows for arm={key[0]!r} seed={key[1]} num_steps={key[2]} sample_seed={sample_seed}')
    models[key][sample_seed] = r
  return models


def _seed_table(models, metric):
  """{(arm, num_steps): {seed: metric at the model's smallest sample seed}}."""
  table = collections.defaultdict(dict)
  for (arm, seed, steps), by_sample in models.items():
    table[arm, steps][seed] = by_sample[min(by_sample)].get(metric)
  return table


def sampling_noise(models, metric):
  """How much a metric moves between sample seeds of the same model: the yardstick for differences between arms.

  Over every model (arm, seed, num_steps) evaluated at two or more sample seeds, and every pair of its sample
  seeds with both values present: the mean and the max of |value(s1) - value(s2)|. Returns dict(mean_abs_diff,
  max_abs_diff, n_models, n_pairs); the figures are None when no model has two sample seeds.
  """
  diffs, n_models = [], 0
  for by_sample in models.values():
    values = [by_sample[s].get(metric) for s in sorted(by_sample)]
    values = [float(v) for v in values if not _is_missing(v)]
    if len(values) < 2:
      continue
    n_models += 1
    diffs.extend(abs(x - y) for x, y in itertools.combinations(values, 2))
  return dict(mean_abs_diff=float(np.mean(diffs)) if diffs else None,
              max_abs_diff=float(np.max(diffs)) if diffs else None, n_models=n_models, n_pairs=len(diffs))


def _str_keys(result):
  """per_seed with str keys, so the summary is unchanged by a JSON round trip."""
  return dict(result, per_seed={str(s): v for s, v in result['per_seed'].items()})


def summarize(rows, *, baseline='pd', method='sferd', metric='fid', guidance_arm='pd+guidance',
              predictor_arm='pd+predictor', extractor=None, confidence=0.95):
  """The study's results from its rows, as a JSON-able dict (unchanged by a JSON round trip).

  Keys:
    metric, baseline, method, confidence, extractor   what was summarized
    arms     arm names in table order (ARM_ORDER first)
    steps    step counts present, descending (e.g. [4, 2, 1])
    cells    [{arm, num_steps, mean, low, high, n, std, excluded, seeds}]: mean_interval of the metric over
             distillation seeds, each model taken at its smallest sample seed (see the module docstring)
    ratio_1step   paired_ratio(method, baseline) at 1 step, or None without 1-step rows
    ratios   [{num_steps, ratio, low, high, n, per_seed}] the same ratio at every step count
    gains    [{num_steps, guidance, predictor, both, interaction}]: paired_difference results, the metric being
             lower-is-better: guidance = m(baseline) - m(guidance_arm), predictor = m(baseline) -
             m(predictor_arm), both = m(baseline) - m(method), interaction = both - guidance - predictor per seed
             (over the seeds all four arms have, so its mean can differ from the difference of the other means
             when arms miss seeds). A positive interaction: the two parts help more together than apart.
    sampling_noise  {metric name: sampling_noise(...)} for 'fid', 'kid_mean' and the summarized metric

  Rows of one extractor only (pass `extractor` when the rows mix several). Arms missing for some seeds, step
  counts or altogether give smaller n (or n = 0 and None), never an error.
  """
  models = _models(rows, extractor=extractor)
  used_extractors = sorted({str(by[s].get('extractor')) for by in models.values() for s in by})
  table = _seed_table(models, metric)
  arms = _arm_order(list(dict.fromkeys(arm for arm, _, _ in models)))
  steps = sorted({steps for _, _, steps in models}, reverse=True)

  cells = []
  for arm in arms:
    for n_steps in steps:
      if (arm, n_steps) not in table:
        continue
      by_seed = table[arm, n_steps]
      seeds = sorted(s for s, v in by_seed.items() if not _is_missing(v))
      cells.append(dict(arm=arm, num_steps=n_steps, **mean_interval(
          [by_seed[s] for s in sorted(by_seed)], confidence=confidence), seeds=seeds))

  def at(arm, n_steps):
    return table.get((arm, n_steps), {})

  ratios, gains = [], []
  for n_steps in steps:
    ratio = _str_keys(paired_ratio(at(method, n_steps), at(baseline, n_steps), confidence=confidence))
    ratios.append(dict(num_steps=n_steps, **ratio))
    base = at(baseline, n_steps)
    diff = lambda arm: _str_keys(paired_difference(base, at(arm, n_steps), confidence=confidence))  # pylint: disable=cell-var-from-loop
    interaction = _contrast([(1.0, at(guidance_arm, n_steps)), (1.0, at(predictor_arm, n_steps)),
                             (-1.0, base), (-1.0, at(method, n_steps))], confidence=confidence)
    gains.append(dict(num_steps=n_steps, guidance=diff(guidance_arm), predictor=diff(predictor_arm),
                      both=diff(method), interaction=_str_keys(interaction)))
  ratio_1step = next((dict(r) for r in ratios if r['num_steps'] == 1), None)
  if ratio_1step is not None:
    del ratio_1step['num_steps']

  noise_metrics = list(dict.fromkeys(NOISE_METRICS + (metric,)))
  return dict(metric=metric, baseline=baseline, method=method, guidance_arm=guidance_arm,
              predictor_arm=predictor_arm, confidence=confidence,
              extractor=extractor if extractor is not None else (used_extractors[0] if len(used_extractors) == 1
                                                                 else None),
              arms=arms, steps=steps, cells=cells, ratio_1step=ratio_1step, ratios=ratios, gains=gains,
              sampling_noise={m: sampling_noise(models, m) for m in noise_metrics})


# ----------------------------------------------------------------------------------------------------------------
# Table and plot.


def _fmt(value, digits=2):
  return '-' if value is None else f'{value:.{digits}f}'


def format_interval(result, *, key='mean', digits=2):
  """'mean [low, high]', 'mean (n=1)' when there is no interval, '-' when there is no value."""
  if result is None or result.get(key) is None:
    return '-'
  if result.get('low') is None:
    return f"{_fmt(result[key], digits)} (n={result['n']})"
  return f"{_fmt(result[key], digits)} [{_fmt(result['low'], digits)}, {_fmt(result['high'], digits)}]"


def _count(n, noun):
  return f'{n} {noun}' + ('' if n == 1 else 's')


def _steps_label(n_steps):
  return f'{n_steps} step' + ('' if n_steps == 1 else 's')


def markdown_table(summary):
  """The summary as Markdown: the metric per arm and step count, then the ratio, the gains and sampling noise."""
  metric, steps, pct = summary['metric'], summary['steps'], round(100 * summary['confidence'])
  cells = {(c['arm'], c['num_steps']): c for c in summary['cells']}
  lines = [f"## {metric.upper()} by arm and sampling steps",
           '',
           f"Mean over distillation seeds [{pct}% Student-t interval]; each model at its smallest sample seed. "
           f"Extractor: {summary.get('extractor') or '-'}.",
           '',
           '| arm | ' + ' | '.join(_steps_label(s) for s in steps) + ' | seeds |',
           '|---|' + '---:|' * len(steps) + '---:|']
  for arm in summary['arms']:
    row = [format_interval(cells.get((arm, s))) for s in steps]
    n = max((cells[arm, s]['n'] for s in steps if (arm, s) in cells), default=0)
    lines.append(f'| {arm} | ' + ' | '.join(row) + f' | {n} |')
  lines.append('')

  method, baseline = summary['method'], summary['baseline']
  r = summary['ratio_1step']
  if r is None:
    lines.append(f'R = {metric}({method}) / {metric}({baseline}) at 1 step: no 1-step rows.')
  else:
    per_seed = ', '.join(f'seed {s}: {v:.3f}' for s, v in r['per_seed'].items()) or 'none'
    lines.append(f"R = {metric}({method}) / {metric}({baseline}) at 1 step (geometric mean, paired by seed): "
                 f"{format_interval(r, key='ratio', digits=3)}, n={r['n']}; per seed: {per_seed}.")
  lines += ['',
            f"Gains in {metric} over {baseline} (positive: lower {metric} than {baseline}), paired by seed, "
            f"mean [{pct}% interval]:",
            '',
            '| gain | ' + ' | '.join(_steps_label(s) for s in steps) + ' |',
            '|---|' + '---:|' * len(steps)]
  gains = {g['num_steps']: g for g in summary['gains']}
  names = dict(guidance=f"guidance ({baseline} - {summary['guidance_arm']})",
               predictor=f"predictor ({baseline} - {summary['predictor_arm']})",
               both=f'both ({baseline} - {method})',
               interaction='interaction (both - guidance - predictor)')
  for key, name in names.items():
    lines.append(f'| {name} | ' + ' | '.join(format_interval(gains[s][key]) for s in steps) + ' |')
  lines += ['', 'Sampling noise (same model, different sample seeds; compare with the differences above):', '']
  for name, noise in summary['sampling_noise'].items():
    digits = 4 if name.startswith('kid') else 2
    if not noise['n_pairs']:
      lines.append(f'- {name}: no model evaluated at two sample seeds.')
    else:
      lines.append(f"- {name}: mean |difference| {_fmt(noise['mean_abs_diff'], digits)}, "
                   f"max {_fmt(noise['max_abs_diff'], digits)} "
                   f"({_count(noise['n_models'], 'model')}, {_count(noise['n_pairs'], 'pair')}).")
  return '\n'.join(lines) + '\n'


def plot_fid_vs_steps(summary, path, *, offset=0.04):
  """The metric against sampling steps per arm, with the seed intervals as error bars, saved as PNG at `path`.

  Steps on a log2 axis (1, 2, 4 evenly spaced: each distillation stage halves them); arms are shifted by
  `offset` (in log2 units) from each other so their bars do not overlap. Cells without an interval (n = 1) are
  drawn as markers without bars.
  """
  fig = images_lib.new_figure((6.5, 4.2), purpose='the study plot')
  ax = fig.add_subplot()
  arms = summary['arms']
  for i, arm in enumerate(arms):
    cells = sorted((c for c in summary['cells'] if c['arm'] == arm and c['mean'] is not None),
                   key=lambda c: c['num_steps'])
    if not cells:
      continue
    shift = (i - (len(arms) - 1) / 2.0) * offset
    x = [2.0**(math.log2(c['num_steps']) + shift) for c in cells]
    y = [c['mean'] for c in cells]
    err = np.array([[0.0 if c['low'] is None else c['mean'] - c['low'] for c in cells],
                    [0.0 if c['high'] is None else c['high'] - c['mean'] for c in cells]])
    ax.errorbar(x, y, yerr=err, marker='o', ms=4, capsize=3, lw=1.2, label=arm)
  ax.set_xscale('log', base=2)
  ax.set_xticks(summary['steps'], labels=[str(s) for s in summary['steps']])
  ax.minorticks_off()
  ax.set_xlabel('sampling steps')
  metric = summary['metric']
  name = metric.upper() if metric == 'fid' else metric
  ax.set_ylabel(name)
  ax.set_title(f"{name} vs steps, mean over seeds ({round(100 * summary['confidence'])}% t-interval)")
  ax.legend(fontsize='small')
  fig.savefig(path, dpi=120)
  return path


# ----------------------------------------------------------------------------------------------------------------
# Files.


def _jsonable(value):
  """Rows may hold NumPy scalars and NaN: plain Python, NaN/inf as None (strict JSON has no NaN)."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


def write_report(rows, directory, **summarize_kwargs):
  """Writes results.json ({'rows', 'summary'}), results.md (markdown_table) and fid_vs_steps.png to `directory`.

  Each file is written atomically (a crash leaves the previous report, not half of one). Keyword arguments go
  to summarize. Returns the summary.
  """
  files.makedirs(directory)
  summary = summarize(rows, **summarize_kwargs)
  payload = json.dumps(_jsonable(dict(rows=list(rows), summary=summary)), indent=2, allow_nan=False)
  files.write_text_atomic(os.path.join(directory, RESULTS_JSON), payload + '\n')
  files.write_text_atomic(os.path.join(directory, RESULTS_MD), markdown_table(summary))
  png = os.path.join(directory, PLOT_PNG)
  with files.atomic_path(png) as tmp:
    plot_fid_vs_steps(summary, tmp)
  return summary
