"""The small digits classifier: trains fast, same feature-fn contract as Inception, exact save/load."""

import jax
import numpy as np
import optax
import pytest

from sferd_jax import errors
from sferd_jax.evaluation import classifier
from sferd_jax.evaluation import metrics


@pytest.fixture(scope='module')
def digits():
  """scikit-learn's digits as uint8 16x16x1 (8x8 upsampled by 2), split 1437 train / 360 test."""
  datasets = pytest.importorskip('sklearn.datasets')
  bunch = datasets.load_digits()
  images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
  images = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)[..., None]
  perm = np.random.default_rng(0).permutation(len(images))
  test, train = perm[:360], perm[360:]
  return images[train], bunch.target[train], images[test], bunch.target[test]


@pytest.fixture(scope='module')
def trained(digits):
  train_x, train_y, _, _ = digits
  return classifier.train_classifier(train_x, train_y, seed=0)


def test_trains_to_high_held_out_accuracy(digits, trained):
  _, _, test_x, test_y = digits
  model, params = trained
  acc = classifier.accuracy(model, params, test_x, test_y)
  print(f'held-out digits accuracy: {acc:.4f}')
  assert acc > 0.9  # Chance is 0.1; the default 300 steps give ~0.97.


def test_feature_fn_shapes_and_metrics_work_on_its_features(digits, trained):
  train_x, _, test_x, _ = digits
  model, params = trained
  fn = classifier.make_feature_fn(model, params, batch_size=128)
  out = fn(test_x)
  assert out['pool'].shape == (360, 128) and out['logits'].shape == (360, 10)
  assert out['pool'].dtype == np.float32 and fn.extractor.startswith('classifier/')
  assert fn(test_x[:5, ..., 0])['pool'].shape == (5, 128)  # (N, H, W) for a grey model.
  with pytest.raises(ValueError, match='trained on'):
    fn(np.zeros((2, 32, 32, 1), np.uint8))
  # FID orders real held-out digits far below noise; IS of real digits is high (confident, ~10 classes).
  ref = metrics.feature_statistics(fn(train_x)['pool'])
  noise = np.random.default_rng(0).integers(0, 256, test_x.shape, dtype=np.uint8)
  fid_real = metrics.frechet_distance(*metrics.feature_statistics(out['pool']), *ref)
  fid_noise = metrics.frechet_distance(*metrics.feature_statistics(fn(noise)['pool']), *ref)
  assert fid_noise > 10 * fid_real
  assert metrics.inception_score(out['logits'], num_splits=4)[0] > 7.0


def test_save_load_round_trip(tmp_path, digits, trained):
  _, _, test_x, _ = digits
  model, params = trained
  path = tmp_path / 'clf' / 'digits_classifier.npz'
  classifier.save_classifier(path, model, params)
  model2, params2 = classifier.load_classifier(path)
  assert model2 == model
  a = classifier.make_feature_fn(model, params)(test_x[:20])
  fn2 = classifier.make_feature_fn(model2, params2)
  b = fn2(test_x[:20])
  np.testing.assert_array_equal(a['pool'], b['pool'])
  np.testing.assert_array_equal(a['logits'], b['logits'])
  assert fn2.extractor == classifier.make_feature_fn(model, params).extractor
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    classifier.load_classifier(tmp_path / 'nope.npz')


def test_unlabelled_or_single_class_data_asks_for_the_inception():
  images = np.zeros((6, 8, 8, 1), np.uint8)
  for labels, num_classes, found in ((None, None, 'no labels'), (np.zeros(6, int), None, '1 class'),
                                     (np.array([0, 1] * 3), 1, 'num_classes=1')):
    with pytest.raises(errors.ConfigError, match=f'{found}.*features=inception.*inception_weights'):
      classifier.train_classifier(images, labels, num_classes=num_classes)
  classifier.check_trainable(np.array([0, 1, 1]), num_classes=2)  # two classes: fine


def test_the_train_step_takes_the_data_as_arguments():
  """Closed over, the images would be constants of the compiled step; as arguments they are not."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(40) % 3
  model = classifier.Classifier(num_classes=3, image_shape=(8, 8, 1), widths=(4,), feature_dim=8)
  params = model.init(jax.random.PRNGKey(0), images[:1])['params']
  tx = optax.sgd(0.1)  # Not Adam: its first update is ~lr * sign(grad), blind to the data's values.
  step = classifier.make_train_step(model, tx, key=jax.random.PRNGKey(1), batch_size=4)
  jaxpr = jax.make_jaxpr(step)(params, tx.init(params), 0, images, labels)
  assert not [c.shape for c in jaxpr.consts if np.size(c) >= images[:4].size]
  # The step reads the data it is given: other images, other updates.
  a = step(params, tx.init(params), 0, images, labels)[0]
  b = step(params, tx.init(params), 0, 255 - images, labels)[0]
  assert not np.allclose(a['head']['kernel'], b['head']['kernel'])
