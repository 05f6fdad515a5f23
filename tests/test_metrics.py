"""FID / KID / IS against closed forms and scipy; reference-statistics files."""

import numpy as np
import pytest
import scipy.linalg

from sferd_jax.evaluation import metrics


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, 2 * d))
  return scale * a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _fd_eigen(mu1, s1, mu2, s2):
  """Independent formula: tr (s1 s2)^(1/2) = sum sqrt(eig(s1^(1/2) s2 s1^(1/2))), all symmetric."""
  w, v = np.linalg.eigh(s1)
  r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  ev = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
  return np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev))


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
  expected = np.sum((mu1 - mu2)**2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_and_eigen_formula():
  rng = np.random.default_rng(1)
  d = 32
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
  with_scipy = (np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
  fd = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert fd == pytest.approx(with_scipy, rel=1e-8)
  assert fd == pytest.approx(_fd_eigen(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_of_a_distribution_with_itself_is_zero():
  rng = np.random.default_rng(2)
  mu, sigma = metrics.feature_statistics(rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)))
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_near_singular_covariances():
  rng = np.random.default_rng(3)
  # Fewer samples than dimensions: both covariances have rank 9 of 64, so s1 s2 is singular.
  mu1, s1 = metrics.feature_statistics(rng.normal(size=(10, 64)))
  mu2, s2 = metrics.feature_statistics(rng.normal(size=(10, 64)) + 1.0)
  fd = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(fd)
  assert fd == pytest.approx(_fd_eigen(mu1, s1, mu2, s2), rel=1e-3)
  # An exactly zero-variance direction on both sides.
  s = np.diag([1.0, 2.0, 0.0])
  assert metrics.frechet_distance(np.zeros(3), s, np.ones(3), s) == pytest.approx(3.0, abs=1e-4)


def test_frechet_distance_refuses_non_covariances():
  # sqrt of diag(1, -1) is diag(1, i): a large imaginary part, so not a pair of covariances.
  with pytest.raises(ValueError, match='imaginary'):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match='shapes'):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_statistics_matches_numpy():
  x = np.random.default_rng(4).normal(size=(50, 5)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(x)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
  assert mu.dtype == sigma.dtype == np.float64


def test_kid_same_distribution_is_near_zero_and_shift_is_positive():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(1500, 64)), rng.normal(size=(1500, 64))
  mean, std = metrics.kernel_inception_distance(a, b, num_subsets=50, subset_size=500, rng=0)
  assert abs(mean) < std
  shifted_mean, shifted_std = metrics.kernel_inception_distance(a, b + 0.5, num_subsets=50, subset_size=500, rng=0)
  assert shifted_mean > 10 * max(shifted_std, abs(mean))
  # Seeded: the same rng gives the same subsets.
  assert metrics.kernel_inception_distance(a, b, num_subsets=5, subset_size=100, rng=1) == \
      metrics.kernel_inception_distance(a, b, num_subsets=5, subset_size=100, rng=1)


def test_kid_matches_explicit_unbiased_mmd():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 0.3
  k = lambda a, b: (a @ b.T / 4 + 1)**3
  m = 20
  expected = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1)) + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
              - 2 * k(x, y).mean())
  # subset_size = N: every subset is the whole sample (permuted), so each MMD equals the full one.
  mean, std = metrics.kernel_inception_distance(x, y, num_subsets=3, subset_size=100, rng=0)
  assert mean == pytest.approx(expected, rel=1e-10)
  assert std < 1e-12


def test_inception_score_uniform_and_confident():
  mean, std = metrics.inception_score(np.zeros((100, 1008)), num_splits=10)
  assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  k = 7
  labels = np.arange(700) % k  # Every split of 70 holds each of the k classes 10 times.
  logits = np.zeros((700, 1008))
  logits[np.arange(700), labels] = 50.0
  mean, std = metrics.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6


def test_reference_stats_round_trip_and_refusals(tmp_path):
  rng = np.random.default_rng(7)
  mu, sigma = metrics.feature_statistics(rng.normal(size=(30, 6)))
  path = tmp_path / 'stats' / 'ref.npz'
  metrics.save_reference_stats(path, mu=mu, sigma=sigma, num_images=30, extractor='net/abc')
  stats = metrics.load_reference_stats(path, extractor='net/abc')
  np.testing.assert_array_equal(stats.mu, mu)
  np.testing.assert_array_equal(stats.sigma, sigma)
  assert (stats.num_images, stats.extractor) == (30, 'net/abc')
  with pytest.raises(ValueError, match="made by feature extractor 'net/abc', not 'net/xyz'"):
    metrics.load_reference_stats(path, extractor='net/xyz')
  with pytest.raises(ValueError, match='fewer than the 50'):
    metrics.load_reference_stats(path, extractor='net/abc', min_images=50)
  # An unlabelled file (only mu and sigma, as EDM's) is refused unless the caller vouches for it.
  bare = tmp_path / 'bare.npz'
  np.savez(bare, mu=mu, sigma=sigma)
  with pytest.raises(ValueError, match='None'):
    metrics.load_reference_stats(bare, extractor='net/abc')
  assert metrics.load_reference_stats(bare, extractor=None).extractor == 'unknown'
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    metrics.load_reference_stats(tmp_path / 'missing.npz', extractor='net/abc')


def test_params_fingerprint_is_stable_and_sensitive():
  params = {'a': {'kernel': np.ones((2, 3))}, 'b': np.zeros(4)}
  fp = metrics.params_fingerprint(params)
  assert fp == metrics.params_fingerprint({'b': np.zeros(4), 'a': {'kernel': np.ones((2, 3))}})
  assert fp != metrics.params_fingerprint({'a': {'kernel': np.ones((2, 3))}, 'b': np.full(4, 1e-3)})
  assert len(fp) == 16


def _brute_force_nn(a, b):
  return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_nearest_neighbour_distance_matches_brute_force():
  rng = np.random.default_rng(8)
  a, b = rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=(53, 5)) * 2.0 + 0.5
  # batch_size 8: several query and reference blocks, the last of each shorter.
  got = metrics.nearest_neighbour_distance(a, b, batch_size=8)
  assert got.shape == (37,) and got.dtype == np.float64
  np.testing.assert_allclose(got, _brute_force_nn(a, b), rtol=1e-10)
  np.testing.assert_allclose(metrics.nearest_neighbour_distance(a, b), got, rtol=1e-12)


def test_nearest_neighbour_distance_of_exact_copies_is_zero():
  """Copies of reference rows: exactly 0, where |a|^2 + |b|^2 - 2ab alone leaves ~4e-5 of round-off."""
  rng = np.random.default_rng(9)
  reference = rng.uniform(0, 30, size=(40, 2048)).astype(np.float32)  # Inception-like: 2048-d, non-negative
  copies = reference[[3, 7, 7, 39]]
  got = metrics.nearest_neighbour_distance(copies, reference, batch_size=16)
  np.testing.assert_array_equal(got, np.zeros(4))
  # Not zero for anything else: a small shift shows.
  assert (metrics.nearest_neighbour_distance(copies + 1e-3, reference) > 0).all()


def test_nearest_neighbour_distance_leave_one_out_and_refusals():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(30, 4))
  # Each row against the others: the brute force with the diagonal left out.
  full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  np.fill_diagonal(full, np.inf)
  got = metrics.nearest_neighbour_distance(x, x, batch_size=7, exclude=np.arange(30))
  np.testing.assert_allclose(got, full.min(axis=1), rtol=1e-10)
  assert (got > 0).all()
  # -1 excludes nothing; a row whose only reference row is excluded has no neighbour.
  assert metrics.nearest_neighbour_distance(x[:2], x[:1], exclude=[-1, 0]).tolist() == [0.0, np.inf]
  with pytest.raises(ValueError, match='same D'):
    metrics.nearest_neighbour_distance(x, x[:, :3])
  with pytest.raises(ValueError, match='one entry per row'):
    metrics.nearest_neighbour_distance(x, x, exclude=[0, 1])
