"""A small convolutional classifier whose features stand in for Inception's on small embedded datasets.

FID/KID/IS need a feature extractor; on 16x16 digits, offline, the TF Inception is both unavailable and
meaningless (it sees 299x299 blurs). This net trains in seconds on the dataset itself and exposes the same
feature-fn interface ({'pool', 'logits'}, see features.py), so metrics.py works unchanged with either.
Numbers from it compare runs of this project on one dataset and one saved classifier, nothing else. It needs
labels of at least 2 classes (a ConfigError otherwise): unlabelled data are scored with the Inception.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sferd_jax import errors
from sferd_jax import files
from sferd_jax.evaluation import features
from sferd_jax.evaluation import metrics

EXTRACTOR_PREFIX = 'classifier'


class Classifier(nn.Module):
  """conv stack (stride 2 after the first level) -> global mean -> feature layer ('pool') -> logits."""
  num_classes: int
  image_shape: tuple  # (H, W, C) it was trained on; other shapes are refused by the feature fn.
  widths: tuple = (16, 32, 64)
  feature_dim: int = 128

  @nn.compact
  def __call__(self, images):
    x = jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, name=f'conv_{i}')(x))
      x = nn.relu(nn.Conv(width, (3, 3), name=f'conv_{i}_b')(x))
    x = jnp.mean(x, axis=(1, 2))
    # GELU rather than ReLU: dead units would give constant feature dimensions and a singular covariance.
    pool = nn.gelu(nn.Dense(self.feature_dim, name='feature')(x))
    return {'pool': pool, 'logits': nn.Dense(self.num_classes, name='head')(pool)}


def _check_images(images, labels=None):
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}')
  if labels is not None and np.asarray(labels).shape != images.shape[:1]:
    raise ValueError(f'labels must be (N,), got {np.asarray(labels).shape} for {images.shape[0]} images')
  return images


def untrainable_error(found):
  """The ConfigError for data without 2 classes; `found` says what the data have."""
  return errors.ConfigError(
      f'the feature classifier needs labelled data of at least 2 classes, got {found}: its features would measure '
      'nothing (with one class the loss is 0 whatever the weights). Use the Inception instead: make its weights '
      'with `python -m sferd_jax.evaluation.export_inception SRC.pt OUT.npz` and pass '
      '--config.evaluate.features=inception --config.evaluate.inception_weights=OUT.npz')


def check_trainable(labels, num_classes=None):
  """Refuses training data that are unlabelled or have fewer than 2 classes (a ConfigError naming the fix)."""
  if labels is None:
    raise untrainable_error('no labels')
  present = len(np.unique(np.asarray(labels)))
  if present < 2 or (num_classes is not None and num_classes < 2):
    declared = '' if num_classes is None else f', num_classes={num_classes}'
    raise untrainable_error(f'labels of {present} class(es){declared}')


def make_train_step(model, tx, *, key, batch_size):
  """-> step(params, opt_state, i, data_x, data_y) -> (params, opt_state): one optimizer step on batch i.

  Batch i is a random draw of data (uint8 images, int labels), each shifted by up to 1 pixel (edge padding).
  The data are arguments, not closed over: jitted, a closure would bake the whole training set into the
  compiled program as constants (slow to compile, and held twice in memory).
  """

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)['logits']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, i, data_x, data_y):
    k_idx, k_shift = jax.random.split(jax.random.fold_in(key, i))
    idx = jax.random.randint(k_idx, (batch_size,), 0, data_x.shape[0])
    x = jnp.pad(data_x[idx], ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
    dy, dx = jax.random.randint(k_shift, (2,), 0, 3)
    x = jax.lax.dynamic_slice(x, (0, dy, dx, 0), (batch_size,) + data_x.shape[1:])
    grads = jax.grad(loss_fn)(params, x, data_y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def train_classifier(images, labels, *, num_classes=None, steps=300, batch_size=32, learning_rate=3e-3,
                     widths=(16, 32, 64), feature_dim=128, seed=0):
  """Trains on uint8 (N, H, W, C) images and int labels with Adam (cosine decay); returns (model, params).

  Random shifts of up to 1 pixel (edge padding) augment the few images of small datasets. Unlabelled data or
  fewer than 2 classes are a ConfigError (see check_trainable).
  """
  check_trainable(labels, num_classes)
  images = _check_images(images, labels)
  labels = np.asarray(labels, np.int32)
  num_classes = int(num_classes or labels.max() + 1)
  model = Classifier(num_classes=num_classes, image_shape=tuple(images.shape[1:]), widths=tuple(widths),
                     feature_dim=feature_dim)
  key = jax.random.PRNGKey(seed)
  # Jitted init: eagerly, every op of every layer would compile on its own (seconds on a CPU).
  params = jax.jit(model.init)(key, jnp.zeros((1,) + images.shape[1:], jnp.uint8))['params']
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = jax.jit(tx.init)(params)
  step = jax.jit(make_train_step(model, tx, key=jax.random.fold_in(key, 1), batch_size=batch_size))
  data_x, data_y = jnp.asarray(images), jnp.asarray(labels)
  # A Python loop of jitted steps: XLA:CPU runs backward convolutions inside a scan/while body ~30x slower
  # (jax 0.10), and at this size per-step dispatch costs little.
  for i in range(steps):
    params, opt_state = step(params, opt_state, i, data_x, data_y)
  return model, jax.device_get(params)


def make_feature_fn(model, params, *, batch_size=256):
  """fn(uint8 (N, H, W, C) at the training shape) -> {'pool': (N, feature_dim), 'logits': (N, num_classes)}."""
  base = features.batched_feature_fn(lambda p, x: model.apply({'params': p}, x), params, batch_size=batch_size,
                                     extractor=f'{EXTRACTOR_PREFIX}/{metrics.params_fingerprint(params)}')

  def fn(images):
    images = np.asarray(images)
    if images.ndim == 3 and model.image_shape[-1] == 1:
      images = images[..., None]
    if tuple(images.shape[1:]) != tuple(model.image_shape):
      raise ValueError(f'the classifier was trained on {tuple(model.image_shape)} images, got {images.shape[1:]}')
    return base(images)

  fn.extractor = base.extractor
  return fn


def accuracy(model, params, images, labels):
  logits = make_feature_fn(model, params)(_check_images(images, labels))['logits']
  return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def save_classifier(path, model, params):
  """One .npz: the flattened param tree ('conv_0/kernel', ...) and the model's fields as JSON."""
  config = {'num_classes': model.num_classes, 'image_shape': list(model.image_shape), 'widths': list(model.widths),
            'feature_dim': model.feature_dim}
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  files.makedirs(os.path.dirname(files.absolute(path)))
  with files.open_file(path, 'wb') as f:
    np.savez(f, __config__=np.str_(json.dumps(config)), **flat)


def load_classifier(path):
  """-> (model, params) from save_classifier's file; refuses a file whose params do not fit its config."""
  path = os.fspath(path)
  if not files.isfile(path):
    raise FileNotFoundError(f'classifier {path!r} not found: train one with classifier.train_classifier and '
                            'save it with classifier.save_classifier')
  with files.load_npz(path) as data:
    if '__config__' not in data.files:
      raise ValueError(f'{path!r} is not a classifier file (no __config__)')
    config = json.loads(str(data['__config__']))
    flat = {k: data[k] for k in data.files if k != '__config__'}
  model = Classifier(num_classes=config['num_classes'], image_shape=tuple(config['image_shape']),
                     widths=tuple(config['widths']), feature_dim=config['feature_dim'])
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1,) + model.image_shape,
                                                                                 jnp.uint8))['params']
  expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}
  if expected != {k: v.shape for k, v in flat.items()}:
    raise ValueError(f'{path!r}: params do not match its config {config}')
  return model, traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
