"""Fitting-error analysis (SFERD.md §5): where a model's x prediction errs, and whether its attention points there.

  summary = run_analysis(config, workdir)     # config.analyze; writes <workdir>/analyze/

For real images x0 and each noise level t (log-SNR = the cosine schedule of t): K noises eps_k (the same K at
every t, so that levels differ by t only), z_k = alpha x0 + sigma eps_k, x_hat_k = the model's x prediction at
(z_k, lambda) in inference mode, unclipped (clipping would hide part of the error). Per pixel:
  bias = mean_k x_hat_k - x0,   variance = var_k x_hat_k   (population variance: bias^2 + variance = MSE).
Each attention block's mass map is the attention a key pixel draws (mean over heads, sum over queries),
nearest-upsampled to the image and averaged over the K draws. The correlation of a block at a level is the
Pearson correlation between the variance map and the block's mass map over the pixels of one image, averaged
over images; `correlation_pooled` correlates all pixels of all images at once (it also sees differences between
images). The paper reports the strongest correlation at the 32x32 map of a 64x64 model. `block_ranking` lists the
blocks by correlation, best first (`best_block` is its head; blocks with a NaN correlation come last).

Controls (per level, in summary.json's levels; definitions in its `controls`), deterministic given config.seed:
  correlation_null[block]: a permutation null of the correlation. The same statistic (per-image Pearson, mean
    over images) with each image's mass map paired with ANOTHER image's variance map, for R = num_permutations
    (NULL_PERMUTATIONS = 200) seeded random derangements of the images (the same R for every block and level;
    all D(N) derangements, an exact null, when D(N) <= R, i.e. N <= 5 images for R = 200).
    Deranging images, not shuffling pixels, keeps each map's own spatial structure (smooth, blocky, shaped like
    an object of the dataset), so the null keeps what any two such maps share and only breaks the pairing of a
    model's attention with its own error; a pixel shuffle would give a null near 0 that is too easy to beat.
    Reported: its mean, its 2.5/97.5 percentiles (low, high) and the one-sided p_value
    (1 + #{null >= observed}) / (1 + R), at least 1 / (1 + R). None with a single image.
  partial_correlation[block]: the correlation given the foreground. Objects of Fashion-MNIST and digits sit on a
    black background (-1), and both maps may just track object vs background. Foreground: x0 > -1 +
    FOREGROUND_MARGIN (0.1) in some channel (`foreground_fraction`: its share of pixels). Per image both maps are
    regressed on [1, foreground] by least squares and their residuals correlated; mean over images, skipping
    those whose residuals are constant (a map that is a function of the foreground alone).
  risky_error_ratio: the mean per-pixel MSE (bias^2 + variance) inside the risky mask over that outside, pooled
    over images (risky_mse_inside, risky_mse_outside: the two), and risky_fraction: the mask's share of pixels.
    The mask is the guidance's (guided_teacher.risky_mask): the attention mass map of the guidance block
    (config.sferd.attention_guidance.block, None = guided_teacher.guidance_block's default), mean over the K
    draws, above config.sferd.attention_guidance.threshold. The attention is the analysed model's own, or with
    run_analysis(mask_model_path=...) another model's (e.g. the teacher's) at the same (z, log-SNR) inputs, so
    that two students can be compared inside the same teacher-defined regions. None (with a warning) when the
    guidance block is not a block of the analysed model.

Writes <workdir>/analyze/: summary.json, bias_variance.png, correlation.png, maps_<i>_t<t>.png per level (i: its
index in config.analyze.times), maps.npz (also risky_t<i>: the risky mask, foreground: the foreground mask).
"""

import itertools
import math
import os
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sferd_jax import data as data_lib
from sferd_jax.diffusion import process
from sferd_jax.diffusion import schedules
from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import files
from sferd_jax import images as images_lib
from sferd_jax import layout
from sferd_jax.models import denoiser
from sferd_jax.models import unet
from sferd_jax.sferd import guided_teacher

EXAMPLE_IMAGES = 8  # columns of the maps figures
_NOISE_TAG = 0x66657272  # folds into config.seed: the analysis' noise is not a training phase's
_NULL_TAG = 0x6e756c6c   # with config.seed, seeds the permutation null's derangements
NULL_PERMUTATIONS = 200  # derangements R of the permutation null (run_analysis's num_permutations)
# Foreground: a pixel whose x0 exceeds the black background (-1 in [-1, 1]) by more than this in some channel.
FOREGROUND_MARGIN = 0.1
_CONSTANT_RTOL = 1e-10   # a regression residual this small relative to its map counts as constant (rounding)


class BiasVariance(NamedTuple):
  bias: np.ndarray        # (N, H, W): mean_k x_hat_k - x0, averaged over channels
  variance: np.ndarray    # (N, H, W): var_k x_hat_k, averaged over channels
  bias_sq: float          # mean over images, pixels and channels of (mean_k x_hat_k - x0)^2
  variance_total: float   # mean over images, pixels and channels of var_k x_hat_k


def bias_variance(x0, x_hats):
  """x0 (N, H, W, C) and K predictions x_hats (K, N, H, W, C) -> BiasVariance, in float64.

  The totals are means of per-channel values, so bias_sq + variance_total = mean_k |x_hat_k - x0|^2 exactly;
  the maps average the signed bias and the variance over channels.
  """
  x0, x_hats = np.asarray(x0, np.float64), np.asarray(x_hats, np.float64)
  if x0.ndim != 4 or x_hats.shape[1:] != x0.shape or x_hats.shape[0] < 1:
    raise ValueError(f'x0 must be (N, H, W, C) and x_hats (K, N, H, W, C); got {x0.shape} and {x_hats.shape}')
  bias = x_hats.mean(axis=0) - x0
  variance = x_hats.var(axis=0)
  return BiasVariance(bias=bias.mean(axis=-1), variance=variance.mean(axis=-1), bias_sq=float(np.mean(bias**2)),
                      variance_total=float(np.mean(variance)))


def attention_mass_maps(probs, image_hw):
  """(B, heads, T_query, T_key) attention over a square grid -> (B, H, W) mass maps, nearest-upsampled.

  The mass of a key is guided_teacher.attention_mass: the guidance's risky mask before its threshold.
  Works under jit.
  """
  chex.assert_rank(probs, 4)
  batch, _, _, num_keys = probs.shape
  side = math.isqrt(num_keys)
  height, width = (image_hw, image_hw) if isinstance(image_hw, int) else tuple(image_hw)
  if side * side != num_keys or height % side or width % side:
    raise ValueError(f'{num_keys} keys are not a square grid that divides the {height}x{width} image')
  mass = guided_teacher.attention_mass(probs).reshape(batch, side, side)
  return jnp.repeat(jnp.repeat(mass, height // side, axis=1), width // side, axis=2)


def pearson(a, b, *, axis=None):
  """Pearson correlation of a and b (same shape) over `axis` (None = all elements); NaN where one is constant."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'a and b must have the same shape, got {a.shape} and {b.shape}')
  a = a - a.mean(axis=axis, keepdims=True)
  b = b - b.mean(axis=axis, keepdims=True)
  denominator = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
  with np.errstate(invalid='ignore', divide='ignore'):
    r = (a * b).sum(axis=axis) / denominator
  return np.where(denominator > 0, r, np.nan)


def _nanmean(values):
  values = np.asarray(values, np.float64)
  return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float('nan')


# ----------------------------------------------------------------------------------------------------------------
# Controls: a permutation null, the partial correlation given the foreground, the error inside the risky mask.


def _flat(maps):
  maps = np.asarray(maps, np.float64)
  return maps.reshape(maps.shape[0], -1)


def correlation_matrix(variance, mass):
  """(N, H, W) maps -> (N, N): entry [i, j] is the per-pixel Pearson correlation of variance[i] and mass[j].

  The diagonal is pearson(variance, mass, axis=(1, 2)); NaN where one of the two maps is constant.
  """
  v, m = _flat(variance), _flat(mass)
  if v.shape != m.shape:
    raise ValueError(f'variance and mass must have the same shape, got {np.shape(variance)} and {np.shape(mass)}')
  v = v - v.mean(axis=1, keepdims=True)
  m = m - m.mean(axis=1, keepdims=True)
  denominator = np.outer(np.sqrt((v * v).sum(axis=1)), np.sqrt((m * m).sum(axis=1)))
  with np.errstate(invalid='ignore', divide='ignore'):
    r = (v @ m.T) / denominator
  return np.where(denominator > 0, r, np.nan)


def num_derangements(n):
  """The number of permutations of n items without a fixed point: D(n) = (n - 1) (D(n - 1) + D(n - 2))."""
  previous, current = 1, 0  # D(0), D(1)
  if n == 0:
    return 1
  for k in range(2, n + 1):
    previous, current = current, (k - 1) * (current + previous)
  return current


def derangements(num_images, count, seed):
  """(R, num_images) int: permutations of the images without a fixed point, for the permutation null.

  When there are at most `count` derangements in all (D(5) = 44, D(6) = 265), all of them, once each in
  lexicographic order (an exact null; R = D(num_images) < count is possible). Otherwise R = count seeded uniform
  random derangements (rejection sampling of uniform permutations; a fraction ~1/e has no fixed point), which may
  repeat. Sampling when there are few would repeat the same handful and make the p-value's 1 / (1 + R) floor
  claim a resolution the data do not have (with 2 images, one swap: the honest p-value is 1/2 or 1).
  """
  if num_images < 2:
    raise ValueError(f'a derangement needs at least 2 images, got {num_images}')
  identity = np.arange(num_images)
  if num_derangements(num_images) <= count:
    rows = [p for p in itertools.permutations(range(num_images)) if not np.any(np.asarray(p) == identity)]
    return np.asarray(rows, np.int64).reshape(-1, num_images)
  rng = np.random.default_rng(seed)
  rows = np.empty((count, num_images), np.int64)
  for r in range(count):
    perm = rng.permutation(num_images)
    while np.any(perm == identity):
      perm = rng.permutation(num_images)
    rows[r] = perm
  return rows


class PermutationNull(NamedTuple):
  observed: float    # mean over images of corr(variance[i], mass[i])
  null_mean: float   # mean of the null statistics
  null_low: float    # their 2.5th percentile
  null_high: float   # their 97.5th percentile
  p_value: float     # (1 + #{null >= observed}) / (1 + R), one-sided
  null: np.ndarray   # (R,) mean over images of corr(variance[i], mass[perm[i]]), one per derangement


def permutation_null(variance, mass, permutations):
  """The image-derangement null of the mean per-image variance-mass correlation.

  variance, mass: (N, H, W) maps; permutations: (R, N) derangements of the images (see `derangements`). Null
  statistic r: the same statistic as the observed one, the mean over images of corr(variance[i],
  mass[perm_r[i]]), i.e. each mass map paired with another image's variance map. Every map keeps its own spatial
  structure (its smoothness, the nearest-upsampled blocks, its object shape), so the null keeps whatever
  correlation two unrelated maps of this kind have by construction (e.g. both high on centred objects of one
  dataset) and only removes the pairing of a model's attention with its own error on the same image. A spatial
  shuffle would destroy that structure and give a null near 0 that is too easy to beat. Few images (<= 5 for
  R = 200) give all derangements, an exact null.

  NaN correlations (constant maps) are skipped in each mean, as in the observed statistic. The p-value counts
  the finite null values R': (1 + #{null >= observed}) / (1 + R'); NaN when observed or all nulls are NaN.
  """
  permutations = np.asarray(permutations)
  matrix = correlation_matrix(variance, mass)
  n = matrix.shape[0]
  if permutations.ndim != 2 or permutations.shape[1] != n:
    raise ValueError(f'permutations must be (R, {n}), got {permutations.shape}')
  observed = _nanmean(np.diag(matrix))
  values = matrix[np.arange(n)[None, :], permutations]  # (R, N)
  finite = np.isfinite(values)
  counts = finite.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    null = np.where(counts > 0, np.where(finite, values, 0.0).sum(axis=1) / counts, np.nan)
  kept = null[np.isfinite(null)]
  if not kept.size or not math.isfinite(observed):
    nan = float('nan')
    return PermutationNull(observed, _nanmean(kept), nan, nan, nan, null)
  low, high = np.percentile(kept, [2.5, 97.5])
  p_value = (1.0 + float(np.sum(kept >= observed))) / (1.0 + kept.size)
  return PermutationNull(observed, float(kept.mean()), float(low), float(high), p_value, null)


def foreground_mask(x0):
  """(N, H, W, C) images in [-1, 1] -> (N, H, W) bool: pixels with some channel above -1 + FOREGROUND_MARGIN."""
  x0 = np.asarray(x0)
  if x0.ndim != 4:
    raise ValueError(f'x0 must be (N, H, W, C), got {x0.shape}')
  return x0.max(axis=-1) > -1.0 + FOREGROUND_MARGIN


def _residuals_given_indicator(a, indicator):
  """(N, P) values, (N, P) bool -> the least-squares residuals of each row regressed on [1, indicator].

  With a 0/1 regressor the fit is each group's mean (one group may be empty), so the residual is the value minus
  the mean of its group.
  """
  ones = indicator.astype(np.float64)
  n_in, n_out = ones.sum(axis=1), (1.0 - ones).sum(axis=1)
  mean_in = (a * ones).sum(axis=1) / np.maximum(n_in, 1.0)
  mean_out = (a * (1.0 - ones)).sum(axis=1) / np.maximum(n_out, 1.0)
  return a - np.where(indicator, mean_in[:, None], mean_out[:, None])


def partial_correlation(a, b, indicator):
  """(N,) per-image partial correlations of maps a and b (N, H, W) given a 0/1 map `indicator` (N, H, W).

  Per image: both maps are regressed by least squares on [1, indicator] over the pixels and the residuals are
  correlated (Pearson). NaN where a residual is constant, up to rounding (norm <= _CONSTANT_RTOL times the map's
  own norm): then the map is a function of the indicator alone and has nothing left to correlate.
  """
  if not np.shape(a) == np.shape(b) == np.shape(indicator) or np.ndim(a) < 2:
    raise ValueError(f'a, b and indicator must have the same shape (N, ...), got {np.shape(a)}, {np.shape(b)} and '
                     f'{np.shape(indicator)}')
  a, b, indicator = _flat(a), _flat(b), np.asarray(indicator, bool).reshape(np.shape(a)[0], -1)
  ra, rb = _residuals_given_indicator(a, indicator), _residuals_given_indicator(b, indicator)
  norm_a, norm_b = np.sqrt((ra * ra).sum(axis=1)), np.sqrt((rb * rb).sum(axis=1))
  constant = ((norm_a <= _CONSTANT_RTOL * np.sqrt((a * a).sum(axis=1)))
              | (norm_b <= _CONSTANT_RTOL * np.sqrt((b * b).sum(axis=1))))
  # The residuals have mean 0 (the constant is a regressor): Pearson is their cosine.
  with np.errstate(invalid='ignore', divide='ignore'):
    r = (ra * rb).sum(axis=1) / (norm_a * norm_b)
  return np.where(constant, np.nan, r)


def risky_errors(x0, x_hats, mask):
  """(inside, outside): the mean per-pixel squared error inside the mask and outside it, over all images.

  x0 (N, H, W, C), x_hats (K, N, H, W, C), mask (N, H, W) or (N, H, W, 1), boolean or 0/1. A pixel's error is
  mean_k |x_hat_k - x0|^2 averaged over channels, i.e. bias^2 + variance of that pixel (population variance).
  The means pool the pixels of all images (an image whose mask is empty still counts outside). NaN for an empty
  side.
  """
  x0, x_hats = np.asarray(x0, np.float64), np.asarray(x_hats, np.float64)
  mask = np.asarray(mask)
  if mask.ndim == 4 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if x0.ndim != 4 or x_hats.shape[1:] != x0.shape or mask.shape != x0.shape[:3]:
    raise ValueError(f'x0 must be (N, H, W, C), x_hats (K, N, H, W, C) and mask (N, H, W); got {x0.shape}, '
                     f'{x_hats.shape} and {mask.shape}')
  mask = mask.astype(bool)
  error = np.mean((x_hats - x0)**2, axis=(0, -1))
  inside = float(error[mask].mean()) if mask.any() else float('nan')
  outside = float(error[~mask].mean()) if not mask.all() else float('nan')
  return inside, outside


def risky_error_ratio(x0, x_hats, mask):
  """The mean squared error (bias^2 + variance per pixel) inside the mask over that outside (see risky_errors).

  NaN when the mask is empty or covers every pixel, or the error outside it is 0.
  """
  return _ratio(*risky_errors(x0, x_hats, mask))


def _ratio(inside, outside):
  return inside / outside if math.isfinite(inside) and math.isfinite(outside) and outside > 0 else float('nan')


def block_ranking(correlation):
  """Block names by correlation, best first; ties keep the blocks' order, NaN ones come last in their order."""
  names = list(correlation)
  finite = sorted((n for n in names if math.isfinite(correlation[n])), key=lambda n: -correlation[n])
  return finite + [n for n in names if not math.isfinite(correlation[n])]


def make_predict_fn(model_config):
  """jitted (params, x0, labels, logsnr, eps) -> (x_hat (N, H, W, C), {block: mass map (N, H, W)}), every block."""
  blocks = [b.name for b in unet.attention_blocks(model_config)]
  model = unet.make_unet(model_config, capture_attention=blocks)
  image_hw = (model_config.image_size, model_config.image_size)

  @jax.jit
  def predict(params, x0, labels, logsnr, eps):
    logsnr = jnp.full((x0.shape[0],), logsnr, jnp.float32)
    z = process.diffuse(x=x0, eps=eps, logsnr=logsnr)
    out, state = model.apply({'params': params}, z, logsnr, denoiser.labels_or_none(model_config, labels),
                             train=False, mutable=['intermediates'])
    pred = process.predict(output=out, z=z, logsnr=logsnr, output_type=model_config.output_type)
    probs = unet.attention_probs(state['intermediates'])
    return pred.x, {name: attention_mass_maps(p, image_hw) for name, p in probs.items()}

  return predict


def predictions(predict, params, x0, labels, *, logsnr, noises, batch_size):
  """x_hats (K, N, H, W, C) and {block: mass (N, H, W) averaged over the K draws}, in batches of images."""
  x_hats, mass_sum = [], {}
  for eps in noises:
    xs, masses = [], {}
    for start in range(0, x0.shape[0], batch_size):
      sl = slice(start, start + batch_size)
      x_hat, mass = jax.device_get(predict(params, x0[sl], labels[sl], jnp.float32(logsnr), eps[sl]))
      xs.append(x_hat)
      for name, m in mass.items():
        masses.setdefault(name, []).append(m)
    x_hats.append(np.concatenate(xs))
    for name, parts in masses.items():
      mass_sum[name] = mass_sum.get(name, 0.0) + np.concatenate(parts).astype(np.float64)
  return np.stack(x_hats), {name: m / len(noises) for name, m in mass_sum.items()}


def level_statistics(x0, x_hats, masses, *, permutations=None):
  """Bias/variance totals and, per block, the variance-mass correlations of one noise level and their controls.

  permutations: (R, N) image derangements for the permutation null; None (e.g. one image) = no null (NaN).
  """
  bv = bias_variance(x0, x_hats)
  foreground = foreground_mask(x0)
  correlation, pooled, partial, null = {}, {}, {}, {}
  for name, mass in masses.items():
    correlation[name] = _nanmean(pearson(bv.variance, mass, axis=(1, 2)))
    pooled[name] = float(pearson(bv.variance, mass))
    partial[name] = _nanmean(partial_correlation(bv.variance, mass, foreground))
    if permutations is None:
      null[name] = dict(mean=float('nan'), low=float('nan'), high=float('nan'), p_value=float('nan'))
    else:
      result = permutation_null(bv.variance, mass, permutations)
      null[name] = dict(mean=result.null_mean, low=result.null_low, high=result.null_high, p_value=result.p_value)
  ranking = block_ranking(correlation)
  best = ranking[0] if ranking and math.isfinite(correlation[ranking[0]]) else None
  return bv, dict(bias_sq=bv.bias_sq, variance=bv.variance_total, mse=bv.bias_sq + bv.variance_total,
                  correlation=correlation, correlation_pooled=pooled, best_block=best, block_ranking=ranking,
                  correlation_null=null, partial_correlation=partial,
                  foreground_fraction=float(foreground.mean()))


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch).


def _figure(figsize):
  return images_lib.new_figure(figsize, purpose='the fitting-error plots')


def plot_bias_variance(path, levels):
  fig = _figure((5, 3.5))
  ax = fig.add_subplot()
  times = [lv['t'] for lv in levels]
  for key, label in (('bias_sq', 'bias$^2$'), ('variance', 'variance'), ('mse', 'MSE')):
    ax.plot(times, [lv[key] for lv in levels], 'o-', label=label)
  if all(lv[k] > 0 for lv in levels for k in ('bias_sq', 'variance')):
    ax.set_yscale('log')
  ax.set_xlabel('t (cosine schedule)')
  ax.set_ylabel('per pixel and channel')
  ax.set_title('fitting error of the x prediction')
  ax.legend()
  images_lib.save_figure(fig, path, dpi=120)


def plot_correlation(path, levels, blocks):
  fig = _figure((6, 4))
  ax = fig.add_subplot()
  times = [lv['t'] for lv in levels]
  for block in blocks:
    values = [lv['correlation'][block['name']] for lv in levels]
    ax.plot(times, values, 'o-', label=f"{block['name']} ({block['resolution']}x{block['resolution']})")
  ax.axhline(0.0, color='gray', lw=0.5)
  ax.set_xlabel('t (cosine schedule)')
  ax.set_ylabel('corr(variance map, attention mass)')
  ax.set_title('per-image Pearson correlation, mean over images')
  ax.legend(fontsize='small')
  images_lib.save_figure(fig, path, dpi=120)


def _show_image(ax, image):
  """An image in [-1, 1], (H, W, C)."""
  image = np.clip((np.asarray(image) + 1.0) / 2.0, 0.0, 1.0)
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0.0, vmax=1.0)


def plot_maps(path, *, x0, x_mean, bv, mass, block, t, correlation):
  """Columns: example images. Rows: x0, mean prediction, bias, variance, the block's attention mass."""
  n = min(EXAMPLE_IMAGES, x0.shape[0])
  rows = ['x0', 'mean x_hat', 'bias', 'variance', f'mass {block}' if block else 'mass (none)']
  fig = _figure((1.4 * n + 0.6, 1.4 * len(rows) + 0.4))
  axes = fig.subplots(len(rows), n, squeeze=False)
  # One colour scale per row (shared by its images, so they compare), shown by the row's colourbar.
  bias_lim = float(np.max(np.abs(bv.bias[:n]))) or 1.0
  variance_max = float(np.max(bv.variance[:n])) or 1.0
  mass_max = float(np.max(mass[:n])) if mass is not None else 1.0
  shown = {}
  for i in range(n):
    _show_image(axes[0, i], x0[i])
    _show_image(axes[1, i], x_mean[i])
    shown[2] = axes[2, i].imshow(bv.bias[i], cmap='RdBu_r', vmin=-bias_lim, vmax=bias_lim)
    shown[3] = axes[3, i].imshow(bv.variance[i], cmap='magma', vmin=0.0, vmax=variance_max)
    if mass is not None:
      shown[4] = axes[4, i].imshow(mass[i], cmap='viridis', vmin=0.0, vmax=mass_max or 1.0)
  for row, image in shown.items():
    fig.colorbar(image, ax=list(axes[row, :]), shrink=0.9, pad=0.01)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  for r, label in enumerate(rows):
    axes[r, 0].set_ylabel(label, fontsize='small')
  corr = '' if block is None else f', corr {correlation:.3f}'
  fig.suptitle(f't = {t:g}{corr}', fontsize='medium')
  images_lib.save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------------------------------------------
# The analyze mode.


def maps_plot_name(index, t):
  """The maps figure of level `index`: the index keeps names unique where two t print alike."""
  return f'maps_{index}_t{t:g}.png'


def _load_model(config, workdir):
  """config.analyze.model as sample.model: a path in the workdir or anywhere; None = the workdir's last model."""
  return exports.load(exports.in_workdir(config.analyze.model, workdir))


def _real_images(config, model, num_images):
  """num_images images of config.data (a seeded subset), as floats in [-1, 1], and their labels."""
  source = data_lib.load_source(data_lib.data_config(config))
  want = (model.config.model.image_size, model.config.model.image_size, model.config.model.channels)
  if tuple(source.image_shape) != want:
    raise errors.ConfigError(f'{model.path} takes {want} images but config.data gives {source.describe()}: '
                             "set config.model's image_size and channels to the analysed model's")
  indices = np.sort(np.random.default_rng(config.seed).permutation(len(source))[:num_images])
  images, labels = source.read(indices, num_threads=16)
  return images_lib.from_uint8(images), labels.astype(np.int32), source.describe()


def _json_float(value):
  return float(value) if value is not None and math.isfinite(value) else None


def _mask_model(mask_model_path, workdir, model_config, block):
  """The model whose attention defines the risky mask: loaded like config.analyze.model, checked against ours."""
  mask_model = exports.load(exports.in_workdir(mask_model_path, workdir))
  mask_config = mask_model.config.model
  for key in ('image_size', 'channels'):
    if mask_config[key] != model_config[key]:
      raise errors.ConfigError(f'mask model {mask_model.path} has {key} {mask_config[key]}, the analysed model '
                               f'{model_config[key]}')
  names = [b.name for b in unet.attention_blocks(mask_config)]
  if block not in names:
    raise errors.ConfigError(f'config.sferd.attention_guidance.block={block!r} is not an attention block of '
                             f'the mask model {mask_model.path}; its blocks are {names}')
  return mask_model


def risky_statistics(x0, x_hats, mass, threshold):
  """The risky mask (mass > threshold) of one level and the error inside it vs outside (risky_errors)."""
  mask = np.asarray(mass) > threshold
  inside, outside = risky_errors(x0, x_hats, mask)
  return mask, dict(risky_error_ratio=_ratio(inside, outside), risky_fraction=float(mask.mean()),
                    risky_mse_inside=inside, risky_mse_outside=outside)


def run_analysis(config, workdir, *, mask_model_path=None, num_permutations=NULL_PERMUTATIONS):
  """The fitting-error analysis of config.analyze.model; writes <workdir>/analyze/ and returns the summary.

  mask_model_path: an exported model (a path in the workdir or anywhere, as config.analyze.model) whose attention
    at the same (z, log-SNR) inputs defines the risky mask, e.g. the teacher, so that two students are compared
    in the same regions; None = the analysed model's own attention.
  num_permutations: derangements R of the permutation null.
  """
  cfg = config.analyze
  if cfg.num_images < 1 or cfg.num_noises < 2 or not cfg.times:
    raise errors.ConfigError('config.analyze: num_images must be >= 1, num_noises >= 2 (a variance needs two '
                             'draws) and times non-empty')
  if any(not 0.0 < t < 1.0 for t in cfg.times):
    raise errors.ConfigError(f'config.analyze.times must lie in (0, 1), got {tuple(cfg.times)}')
  model = _load_model(config, workdir)
  model_config = model.config.model
  x0, labels, data_description = _real_images(config, model, cfg.num_images)
  blocks = [dict(name=b.name, resolution=b.resolution, channels=b.channels)
            for b in unet.attention_blocks(model_config)]
  logging.info('analyze: %s, %d images of %s, %d noises, t in %s, %d attention blocks', model.path, len(x0),
               data_description, cfg.num_noises, tuple(cfg.times), len(blocks))
  key = jax.random.fold_in(jax.random.key(config.seed), _NOISE_TAG)
  noises = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, k), x0.shape))
                     for k in range(cfg.num_noises)])
  predict = make_predict_fn(model_config)
  guidance = config.sferd.attention_guidance
  threshold = float(guidance.threshold)
  mask_block = guided_teacher.guidance_block(model_config, guidance)
  mask_model, mask_predict = None, None
  if mask_model_path is None and mask_block not in [b['name'] for b in blocks]:
    # config.sferd.attention_guidance was written for another model: no risky mask, the rest of the analysis runs.
    logging.warning('analyze: config.sferd.attention_guidance.block=%r is not an attention block of %s (%s): no '
                    'risky-mask statistics', mask_block, model.path, [b['name'] for b in blocks])
    mask_block = None
  elif mask_model_path is not None:
    mask_model = _mask_model(mask_model_path, workdir, model_config, mask_block)
    mask_predict = (predict if mask_model.config.model.to_dict() == model_config.to_dict()
                    else make_predict_fn(mask_model.config.model))
  mask_path = model.path if mask_model is None else mask_model.path
  permutations = (derangements(len(x0), num_permutations, (config.seed, _NULL_TAG))
                  if len(x0) >= 2 and num_permutations >= 1 else None)
  exhaustive = len(x0) >= 2 and num_derangements(len(x0)) <= num_permutations
  diffusion = dict(model.config.diffusion)
  out_dir = layout.RunLayout(workdir).analyze_dir
  files.makedirs(out_dir)
  levels, plots, arrays = [], [], {'x0': x0, 'times': np.asarray(cfg.times, np.float32)}
  for i, t in enumerate(cfg.times):
    logsnr = float(schedules.cosine_logsnr(t, logsnr_min=diffusion['logsnr_min'], logsnr_max=diffusion['logsnr_max']))
    x_hats, masses = predictions(predict, model.params, jnp.asarray(x0), jnp.asarray(labels), logsnr=logsnr,
                                 noises=noises, batch_size=config.sample.batch_size)
    bv, stats = level_statistics(x0, x_hats, masses, permutations=permutations)
    if mask_block is None:
      mask_mass = None
    elif mask_model is None:
      mask_mass = masses[mask_block]
    else:
      mask_mass = predictions(mask_predict, mask_model.params, jnp.asarray(x0), jnp.asarray(labels), logsnr=logsnr,
                              noises=noises, batch_size=config.sample.batch_size)[1][mask_block]
    if mask_mass is None:
      stats.update({k: float('nan') for k in ('risky_error_ratio', 'risky_fraction', 'risky_mse_inside',
                                               'risky_mse_outside')})
    else:
      risky, risky_stats = risky_statistics(x0, x_hats, mask_mass, threshold)
      stats.update(risky_stats)
      arrays[f'risky_t{i}'] = risky
    level = dict(t=float(t), logsnr=logsnr, **stats)
    levels.append(level)
    name = maps_plot_name(i, t)
    best = stats['best_block']
    plot_maps(os.path.join(out_dir, name), x0=x0, x_mean=x_hats.mean(axis=0), bv=bv,
              mass=masses.get(best), block=best, t=t, correlation=stats['correlation'].get(best, float('nan')))
    plots.append(name)
    arrays.update({f'bias_t{i}': bv.bias, f'variance_t{i}': bv.variance,
                   **{f'mass_t{i}/{block}': m for block, m in masses.items()}})
    logging.info('analyze: t=%.2f (log-SNR %.2f): bias^2 %.4g, variance %.4g; best block %s (corr %.3f)', t, logsnr,
                 stats['bias_sq'], stats['variance'], best, stats['correlation'].get(best, float('nan')))
    if best is not None:
      null = stats['correlation_null'][best]
      logging.info('analyze: t=%.2f controls for %s: derangement null mean %.3f [%.3f, %.3f], p %.3g; partial corr '
                   'given the foreground (%.0f%% of pixels) %.3f; ranking %s', t, best, null['mean'], null['low'],
                   null['high'], null['p_value'], 100 * stats['foreground_fraction'],
                   stats['partial_correlation'][best], ' > '.join(stats['block_ranking']))
    if mask_block is not None:
      logging.info('analyze: t=%.2f risky mask (%s of %s, mass > %g): %.1f%% of pixels, MSE inside / outside %.3f',
                   t, mask_block, mask_path, threshold, 100 * stats['risky_fraction'], stats['risky_error_ratio'])
  plot_bias_variance(os.path.join(out_dir, 'bias_variance.png'), levels)
  plot_correlation(os.path.join(out_dir, 'correlation.png'), levels, blocks)
  plots = ['bias_variance.png', 'correlation.png'] + plots
  arrays['foreground'] = foreground_mask(x0)
  with files.atomic_path(os.path.join(out_dir, 'maps.npz')) as tmp:
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})

  candidates = [(lv['correlation'][b['name']], lv['t'], b['name']) for lv in levels for b in blocks
                if math.isfinite(lv['correlation'][b['name']])]
  best = max(candidates) if candidates else None
  summary = dict(
      model=model.path, model_name=model.config.get('name'), num_steps=model.config.get('num_steps'),
      data=data_description, num_images=int(len(x0)), num_noises=int(cfg.num_noises),
      correlation_definition=('Pearson correlation between the variance map and the attention mass map over the '
                              'pixels of each image, averaged over images; correlation_pooled: over all pixels of '
                              'all images at once'),
      blocks=blocks,
      levels=[dict(lv, bias_sq=_json_float(lv['bias_sq']), variance=_json_float(lv['variance']),
                   mse=_json_float(lv['mse']),
                   correlation={k: _json_float(v) for k, v in lv['correlation'].items()},
                   correlation_pooled={k: _json_float(v) for k, v in lv['correlation_pooled'].items()},
                   correlation_null={k: {s: _json_float(x) for s, x in v.items()}
                                     for k, v in lv['correlation_null'].items()},
                   partial_correlation={k: _json_float(v) for k, v in lv['partial_correlation'].items()},
                   **{k: _json_float(lv[k]) for k in ('foreground_fraction', 'risky_error_ratio', 'risky_fraction',
                                                      'risky_mse_inside', 'risky_mse_outside')})
              for lv in levels],
      controls=dict(
          num_permutations=None if permutations is None else int(permutations.shape[0]),
          permutations_exhaustive=None if permutations is None else bool(exhaustive),
          correlation_null=('the correlation statistic with each mass map paired with the variance map of another '
                            'image (num_permutations seeded random derangements of the images, or all of them '
                            'when permutations_exhaustive): mean, 2.5th (low) and 97.5th (high) percentiles, and '
                            'p_value = (1 + #{null >= observed}) / (1 + num_permutations), one-sided'),
          foreground_threshold=-1.0 + FOREGROUND_MARGIN,
          partial_correlation=('per image, the Pearson correlation of the residuals of the variance and the mass '
                               'maps regressed on [1, foreground] (foreground: x0 > foreground_threshold in some '
                               'channel), averaged over images with non-constant residuals'),
          risky_mask=dict(model=mask_path, block=mask_block, threshold=threshold,
                          definition=('per image, the mask model\'s attention mass map of the block (mean over '
                                      'the noise draws, nearest-upsampled) > threshold; risky_error_ratio: mean '
                                      'per-pixel MSE (bias^2 + variance) inside the mask over that outside, pooled '
                                      'over images; risky_fraction: the mask\'s share of pixels'))),
      best=None if best is None else dict(correlation=best[0], t=best[1], block=best[2]),
      plots=plots, maps='maps.npz')
  files.write_json_atomic(os.path.join(out_dir, 'summary.json'), summary)
  logging.info('analyze: wrote %s (plots: %s)', out_dir, ', '.join(plots))
  return summary
