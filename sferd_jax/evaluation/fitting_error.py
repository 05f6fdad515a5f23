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
images). The paper reports the strongest correlation at the 32x32 map of a 64x64 model.

Writes <workdir>/analyze/: summary.json, bias_variance.png, correlation.png, maps_<i>_t<t>.png per level (i: its
index in config.analyze.times), maps.npz.
"""

import json
import math
import os
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sferd_jax import config as config_lib
from sferd_jax import data as data_lib
from sferd_jax import images as images_lib
from sferd_jax import sampling
from sferd_jax.diffusion import process
from sferd_jax.diffusion import schedules
from sferd_jax.models import denoiser
from sferd_jax.models import unet
from sferd_jax.sferd import guided_teacher

ANALYZE_DIR = 'analyze'
EXAMPLE_IMAGES = 8  # columns of the maps figures
_NOISE_TAG = 0x66657272  # folds into config.seed: the analysis' noise is not a training phase's


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


def level_statistics(x0, x_hats, masses):
  """Bias/variance totals and, per block, the variance-mass correlations of one noise level."""
  bv = bias_variance(x0, x_hats)
  correlation, pooled = {}, {}
  for name, mass in masses.items():
    correlation[name] = _nanmean(pearson(bv.variance, mass, axis=(1, 2)))
    pooled[name] = float(pearson(bv.variance, mass))
  finite = {k: v for k, v in correlation.items() if math.isfinite(v)}
  best = max(finite, key=finite.get) if finite else None
  return bv, dict(bias_sq=bv.bias_sq, variance=bv.variance_total, mse=bv.bias_sq + bv.variance_total,
                  correlation=correlation, correlation_pooled=pooled, best_block=best)


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch).


def _figure(figsize):
  try:
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('the fitting-error plots need matplotlib: pip install matplotlib') from e
  fig = figure.Figure(figsize=figsize, layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  return fig


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
  fig.savefig(path, dpi=120)


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
  fig.savefig(path, dpi=120)


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
  bias_lim = float(np.max(np.abs(bv.bias[:n]))) or 1.0
  for i in range(n):
    _show_image(axes[0, i], x0[i])
    _show_image(axes[1, i], x_mean[i])
    axes[2, i].imshow(bv.bias[i], cmap='RdBu_r', vmin=-bias_lim, vmax=bias_lim)
    axes[3, i].imshow(bv.variance[i], cmap='magma')
    if mass is not None:
      axes[4, i].imshow(mass[i], cmap='viridis')
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  for r, label in enumerate(rows):
    axes[r, 0].set_ylabel(label, fontsize='small')
  corr = '' if block is None else f', corr {correlation:.3f}'
  fig.suptitle(f't = {t:g}{corr}', fontsize='medium')
  fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------------------------
# The analyze mode.


def maps_plot_name(index, t):
  """The maps figure of level `index`: the index keeps names unique where two t print alike."""
  return f'maps_{index}_t{t:g}.png'


def _load_model(config, workdir):
  """config.analyze.model as sample.model: a path in the workdir or anywhere; None = the workdir's last model."""
  return sampling.load(sampling.in_workdir(config.analyze.model, workdir))


def _real_images(config, model, num_images):
  """num_images images of config.data (a seeded subset), as floats in [-1, 1], and their labels."""
  source = data_lib.load_source(data_lib.data_config(config))
  want = (model.config.model.image_size, model.config.model.image_size, model.config.model.channels)
  if tuple(source.image_shape) != want:
    raise config_lib.ConfigError(f'{model.path} takes {want} images but config.data gives {source.describe()}: '
                                 "set config.model's image_size and channels to the analysed model's")
  indices = np.sort(np.random.default_rng(config.seed).permutation(len(source))[:num_images])
  images, labels = source.read(indices, num_threads=16)
  return images_lib.from_uint8(images), labels.astype(np.int32), source.describe()


def _json_float(value):
  return float(value) if value is not None and math.isfinite(value) else None


def run_analysis(config, workdir):
  """The fitting-error analysis of config.analyze.model; writes <workdir>/analyze/ and returns the summary."""
  cfg = config.analyze
  if cfg.num_images < 1 or cfg.num_noises < 2 or not cfg.times:
    raise config_lib.ConfigError('config.analyze: num_images must be >= 1, num_noises >= 2 (a variance needs two '
                                 'draws) and times non-empty')
  if any(not 0.0 < t < 1.0 for t in cfg.times):
    raise config_lib.ConfigError(f'config.analyze.times must lie in (0, 1), got {tuple(cfg.times)}')
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
  diffusion = dict(model.config.diffusion)
  out_dir = os.path.join(workdir, ANALYZE_DIR)
  os.makedirs(out_dir, exist_ok=True)
  levels, plots, arrays = [], [], {'x0': x0, 'times': np.asarray(cfg.times, np.float32)}
  for i, t in enumerate(cfg.times):
    logsnr = float(schedules.cosine_logsnr(t, logsnr_min=diffusion['logsnr_min'], logsnr_max=diffusion['logsnr_max']))
    x_hats, masses = predictions(predict, model.params, jnp.asarray(x0), jnp.asarray(labels), logsnr=logsnr,
                                 noises=noises, batch_size=config.sample.batch_size)
    bv, stats = level_statistics(x0, x_hats, masses)
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
  plot_bias_variance(os.path.join(out_dir, 'bias_variance.png'), levels)
  plot_correlation(os.path.join(out_dir, 'correlation.png'), levels, blocks)
  plots = ['bias_variance.png', 'correlation.png'] + plots
  np.savez(os.path.join(out_dir, 'maps.npz'), **{k: np.asarray(v, np.float32) for k, v in arrays.items()})

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
                   correlation_pooled={k: _json_float(v) for k, v in lv['correlation_pooled'].items()})
              for lv in levels],
      best=None if best is None else dict(correlation=best[0], t=best[1], block=best[2]),
      plots=plots, maps='maps.npz')
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  logging.info('analyze: wrote %s (plots: %s)', out_dir, ', '.join(plots))
  return summary
