"""FID, KID and IS from features, and reference statistics on disk. NumPy/SciPy only, float64 throughout.

The formulas are the ones of the literature's reference code, so numbers are comparable given the same
feature extractor and sample count: FID as TTUR / pytorch-fid (covariance with ddof=1, scipy sqrtm), KID as
Binkowski et al. / clean-fid (unbiased MMD^2, kernel (x.y / d + 1)^3, averaged over random subsets), IS as
Salimans et al. (exp E[KL(p(y|x) || p(y))] per split). Also the nearest-neighbour distance of the memorisation
check (samples much closer to training images than held-out real images suggest copies).
"""

import hashlib
import os
import warnings
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.special

from sferd_jax import files


def feature_statistics(features):
  """(N, D) features -> mean (D,) and covariance (D, D) with ddof=1, in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'features must be (N >= 2, D), got shape {features.shape}')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(a):
  """scipy's Schur sqrtm and its relative Frobenius error (scipy >= 1.16 no longer returns it)."""
  with warnings.catch_warnings():
    # Singular products are expected (few samples); the error below decides whether to retry with an offset.
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    root = scipy.linalg.sqrtm(a)
  norm = np.linalg.norm(a, 'fro')
  err = np.linalg.norm(root @ root - a, 'fro') / norm if norm > 0 else 0.0
  return root, err


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps=1e-6, max_imag=1e-3):
  """|mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)), the FID of two Gaussians.

  When s1 s2 is near singular (few samples, or more dimensions than samples) its square root is inaccurate
  or not finite; then, as pytorch-fid does, eps is added to both diagonals. A tiny imaginary part of the root
  (round-off on eigenvalues near 0) is dropped; a large one means the inputs are not covariances: ValueError.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}')
  diff = mu1 - mu2
  covmean, err = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all() or err > 1e-3:
    offset = np.eye(sigma1.shape[0]) * eps
    covmean, err = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
      raise ValueError('the matrix square root of sigma1 @ sigma2 is not finite, even with an eps offset')
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > max_imag:
      raise ValueError(f'the matrix square root has a large imaginary part ({imag:.3g} > {max_imag}): '
                       'sigma1 and sigma2 must be symmetric positive semi-definite covariances')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def kernel_inception_distance(features1, features2, *, num_subsets=100, subset_size=1000, rng):
  """KID: (mean, std) over random subsets of the unbiased MMD^2 with kernel k(x, y) = (x.y / d + 1)^3.

  Subsets have min(subset_size, N1, N2) rows drawn without replacement; rng is a np.random.Generator or a seed.
  """
  f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f'features must be (N, D) with the same D, got {f1.shape} and {f2.shape}')
  rng = np.random.default_rng(rng)
  d = f1.shape[1]
  m = min(subset_size, f1.shape[0], f2.shape[0])
  if m < 2:
    raise ValueError('KID needs at least 2 samples on each side')
  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    x = f1[rng.choice(f1.shape[0], m, replace=False)]
    y = f2[rng.choice(f2.shape[0], m, replace=False)]
    kxx = (x @ x.T / d + 1.0)**3
    kyy = (y @ y.T / d + 1.0)**3
    kxy = (x @ y.T / d + 1.0)**3
    # Unbiased: the diagonals k(x_i, x_i) are left out of the within-sample means.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    mmds[i] = within - 2.0 * kxy.mean()
  return float(mmds.mean()), float(mmds.std())


def inception_score(logits, *, num_splits=10):
  """IS: (mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean prediction."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < num_splits:
    raise ValueError(f'logits must be (N >= num_splits, K), got {logits.shape} with num_splits={num_splits}')
  logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for part in np.array_split(logp, num_splits):
    log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = np.sum(np.exp(part) * (part - log_py), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def nearest_neighbour_distance(features, reference_features, *, batch_size=1024, exclude=None):
  """Per row of features (N, D): the Euclidean distance to its nearest row of reference_features (M, D), (N,) f64.

  The memorisation check: a sample that copies a training image is at distance ~0 from the training features.
  Computed in blocks of batch_size x batch_size, so 50k x 50k never holds an N x M matrix. The nearest row is
  found with |a|^2 + |b|^2 - 2 a.b in float64 (clamped at 0: round-off can make it slightly negative), then its
  distance is recomputed as |a - b|, so that an exact copy gives exactly 0 rather than round-off.

  exclude: optional (N,) index of one reference row to ignore per row (-1: none), for a real image that is itself
  in the reference (leave-one-out). A row whose every reference row is excluded gets inf.
  """
  r = np.asarray(reference_features, np.float64)
  f = np.asarray(features)
  if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
    raise ValueError(f'features must be (N, D) with the same D, got {f.shape} and {r.shape}')
  if r.shape[0] == 0 or batch_size < 1:
    raise ValueError(f'need at least one reference row and batch_size >= 1, got {r.shape[0]} and {batch_size}')
  exclude = np.full(f.shape[0], -1, np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
  if exclude.shape != (f.shape[0],):
    raise ValueError(f'exclude must have one entry per row ({f.shape[0]}), got {exclude.shape}')
  r_sq = np.einsum('ij,ij->i', r, r)
  out = np.full(f.shape[0], np.inf)
  for lo in range(0, f.shape[0], batch_size):
    q = f[lo:lo + batch_size].astype(np.float64)  # Cast per block: the whole query set stays in its dtype.
    q_sq, ex = np.einsum('ij,ij->i', q, q), exclude[lo:lo + batch_size]
    best, arg = np.full(len(q), np.inf), np.full(len(q), -1)
    for start in range(0, r.shape[0], batch_size):
      block = r[start:start + batch_size]
      d2 = np.maximum(q_sq[:, None] + r_sq[None, start:start + len(block)] - 2.0 * (q @ block.T), 0.0)
      rows = np.nonzero((ex >= start) & (ex < start + len(block)))[0]
      d2[rows, ex[rows] - start] = np.inf
      j = np.argmin(d2, axis=1)
      m = d2[np.arange(len(q)), j]
      better = m < best
      best[better], arg[better] = m[better], j[better] + start
    found = arg >= 0
    dist = np.full(len(q), np.inf)
    dist[found] = np.linalg.norm(q[found] - r[arg[found]], axis=1)
    out[lo:lo + len(q)] = dist
  return out


def params_fingerprint(params):
  """First 16 hex digits of a sha256 over a (nested dict) param tree's sorted names, shapes and float32 bytes."""
  h = hashlib.sha256()

  def visit(prefix, node):
    if isinstance(node, dict) or hasattr(node, 'items'):
      for key in sorted(node):
        visit(f'{prefix}/{key}', node[key])
    else:
      arr = np.ascontiguousarray(np.asarray(node, np.float32))
      h.update(f'{prefix}:{arr.shape}'.encode())
      h.update(arr.tobytes())

  visit('', params)
  return h.hexdigest()[:16]


class ReferenceStats(NamedTuple):
  mu: np.ndarray
  sigma: np.ndarray
  num_images: int
  extractor: str


def save_reference_stats(path, *, mu, sigma, num_images, extractor):
  """Writes mu, sigma, num_images and the extractor's name (e.g. a feature fn's `.extractor`) to an .npz."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f'mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
  files.makedirs(os.path.dirname(files.absolute(path)))
  with files.open_file(path, 'wb') as f:  # A file object: np.savez would otherwise append '.npz' to other suffixes.
    np.savez(f, mu=mu, sigma=sigma, num_images=np.int64(num_images), extractor=np.str_(extractor))


def load_reference_stats(path, *, extractor, min_images=None):
  """Reads save_reference_stats' file and refuses it unless it was made by `extractor` (and has >= min_images).

  extractor=None accepts any file, including unlabelled ones with only mu and sigma (e.g. EDM's or
  clean-fid's): only do that for files known to come from the same network and preprocessing.
  """
  path = os.fspath(path)
  if not files.isfile(path):
    raise FileNotFoundError(f'reference statistics {path!r} not found: compute them from the dataset with the '
                            'same feature extractor (metrics.feature_statistics + save_reference_stats)')
  with files.load_npz(path) as data:
    if 'mu' not in data.files or 'sigma' not in data.files:
      raise ValueError(f'{path!r} has no mu/sigma arrays (keys: {data.files})')
    mu, sigma = data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
    num_images = int(data['num_images']) if 'num_images' in data.files else -1
    found = str(data['extractor']) if 'extractor' in data.files else None
  if extractor is not None and found != extractor:
    raise ValueError(f'{path!r} was made by feature extractor {found!r}, not {extractor!r}: FID against it would '
                     'be meaningless. Recompute the reference statistics with this extractor.')
  if min_images is not None and num_images < min_images:
    raise ValueError(f'{path!r} holds statistics of {num_images} images, fewer than the {min_images} required')
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f'{path!r}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
  return ReferenceStats(mu, sigma, num_images, found if found is not None else 'unknown')
