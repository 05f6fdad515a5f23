"""Data layer: sources, deterministic/resumable batches, per-process slices, flips, prefetching. Offline."""

import gzip
import os
import socket
import struct
import sys

import numpy as np
import pytest

from sferd_jax import data
from sferd_jax import errors


def _config(**overrides):
  cfg = dict(name='digits', image_size=16, channels=1, data_dir=None, random_flip=False, split='train', path=None)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope='module')
def digits16():
  return data.digits(16)


def _batches(source, **kwargs):
  kwargs = {'global_batch_size': 64, 'seed': 0, 'process_index': 0, 'process_count': 1, **kwargs}
  return data.Batches(source, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Sources.


def test_digits(digits16):
  src = digits16
  assert len(src) == 1797 and src.image_shape == (16, 16, 1) and src.num_classes == 10
  assert src.images.dtype == np.uint8 and src.images.shape == (1797, 16, 16, 1)
  assert src.images.min() == 0 and src.images.max() == 255
  assert set(np.unique(src.labels)) == set(range(10)) and src.labels.dtype == np.int32
  example = src[5]
  assert example['image'].shape == (16, 16, 1) and example['image'].dtype == np.uint8
  assert isinstance(example['label'], (np.integer, int))
  assert 'digits' in src.describe() and '1797' in src.describe() and '16x16x1' in src.describe()


def test_digits_native_size_and_channels():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits()
  src8 = data.digits(8)
  np.testing.assert_array_equal(src8.images[..., 0], np.rint(raw.images * 255 / 16).astype(np.uint8))
  np.testing.assert_array_equal(src8.labels, raw.target)
  src3 = data.digits(16, channels=3)
  assert src3.image_shape == (16, 16, 3)
  np.testing.assert_array_equal(src3.images[..., 0], src3.images[..., 2])


def test_resize_is_smooth(digits16):
  # Bicubic upsampling of the 8x8 original: the mean brightness is kept and neighbouring pixels stay close.
  src8 = data.digits(8)
  np.testing.assert_allclose(digits16.images.mean(), src8.images.mean(), rtol=0.05)
  assert np.abs(np.diff(digits16.images.astype(int), axis=1)).mean() < np.abs(np.diff(src8.images.astype(int),
                                                                                     axis=1)).mean()


def test_load_source_reads_config(digits16):
  src = data.load_source(_config())
  np.testing.assert_array_equal(src.images, digits16.images)
  with pytest.raises(KeyError, match='path'):
    data.load_source({k: v for k, v in _config().items() if k != 'path'})
  with pytest.raises(ValueError, match='Unknown data.name'):
    data.load_source(_config(name='mnist'))
  ml_collections = pytest.importorskip('ml_collections')
  src = data.load_source(ml_collections.ConfigDict(_config(image_size=8, channels=3)))
  assert src.image_shape == (8, 8, 3)


def test_array_source_validates():
  with pytest.raises(ValueError, match='uint8'):
    data.ArraySource(np.zeros((4, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match='labels'):
    data.ArraySource(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(3))
  src = data.ArraySource(np.zeros((4, 8, 8), np.uint8))  # (N, H, W) gets a channel axis; no labels -> class 0
  assert src.image_shape == (8, 8, 1) and src.num_classes == 1 and not src.labels.any()


def test_npz_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, 10)
  path = str(tmp_path / 'mine.npz')
  np.savez(path, images=images, labels=labels)
  src = data.load_source(_config(name='npz', image_size=8, channels=3, path=path))
  np.testing.assert_array_equal(src.images, images)
  np.testing.assert_array_equal(src.labels, labels)
  assert src.num_classes == labels.max() + 1 and src.name == 'npz:mine'
  # Shapes must match the config: no silent resizing of a user's data.
  with pytest.raises(errors.DataError, match='model.image_size=8, model.channels=3'):
    data.load_source(_config(name='npz', image_size=16, channels=3, path=path))
  unlabelled = str(tmp_path / 'unlabelled.npz')
  np.savez(unlabelled, images=images)
  src = data.npz(unlabelled)
  assert src.num_classes == 1 and not src.labels.any()
  with pytest.raises(errors.DatasetNotFoundError, match='images'):
    data.npz(str(tmp_path / 'missing.npz'))


_IMAGES = np.zeros((4, 8, 8, 1), np.uint8)


@pytest.mark.parametrize('arrays, message', [
    (dict(images=_IMAGES.astype(np.float32)), "'images' are float32, not uint8 .from floats"),
    (dict(images=np.full((4, 8, 8, 1), np.nan, np.float32)), 'not uint8'),
    (dict(images=np.zeros((4, 8), np.uint8)), 'have shape \\(4, 8\\)'),
    (dict(images=np.zeros((0, 8, 8, 1), np.uint8)), 'no empty axis'),
    (dict(pictures=_IMAGES), "has no 'images' array .its arrays: \\['pictures'\\]"),
    (dict(images=_IMAGES, labels=np.zeros((3,), np.int32)), "'labels' are int32 \\(3,\\)"),
    (dict(images=_IMAGES, labels=np.zeros((4,), np.float32)), "'labels' are float32"),
    (dict(images=_IMAGES, labels=np.array([0, 1, -1, 0])), 'down to -1'),
    (dict(images=_IMAGES, labels=np.array([0, 1, 5, 0]), num_classes=np.int64(3)),
     "'num_classes' is 3 but a label is 5"),
    (dict(images=_IMAGES, num_classes=np.array([3, 4])), "'num_classes' is int64 \\(2,\\)"),
    (dict(images=np.array([{'a': 1}] * 4, dtype=object)), 'Python objects, which is never loaded'),
])
def test_every_npz_defect_is_a_data_error_naming_it(tmp_path, arrays, message):
  path = str(tmp_path / 'bad.npz')
  np.savez(path, **arrays)
  with pytest.raises(errors.DataError, match=message) as raised:
    data.npz(path)
  assert path in str(raised.value) and 'An npz dataset holds' in str(raised.value)


def test_a_file_that_is_not_an_npz_is_a_data_error(tmp_path):
  path = tmp_path / 'garbage.npz'
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
  with pytest.raises(errors.DataError, match='cannot be read as an .npz'):
    data.npz(str(path))


def _write_idx(path, array):
  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack('>' + 'I' * array.ndim, *array.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
  rng = np.random.default_rng(1)
  arrays = {}
  for prefix, n in (('train', 6), ('t10k', 3)):
    arrays[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8))
    _write_idx(str(tmp_path / f'{prefix}-images-idx3-ubyte.gz'), arrays[prefix][0])
    _write_idx(str(tmp_path / f'{prefix}-labels-idx1-ubyte.gz'), arrays[prefix][1])
  return str(tmp_path), arrays


def test_read_idx(tmp_path):
  array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(str(tmp_path / 'plain'), array)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / 'plain')), array)
  (tmp_path / 'bad').write_bytes(b'\x01\x02\x03\x04')
  with pytest.raises(ValueError, match='not an idx file'):
    data.read_idx(str(tmp_path / 'bad'))


def test_fashion_mnist_idx(fashion_dir):
  folder, arrays = fashion_dir
  src = data.fashion_mnist('train', folder)
  assert len(src) == 6 and src.image_shape == (28, 28, 1) and src.num_classes == 10
  np.testing.assert_array_equal(src.images[..., 0], arrays['train'][0])
  np.testing.assert_array_equal(src.labels, arrays['train'][1])
  test = data.load_source(_config(name='fashion_mnist', image_size=32, channels=3, data_dir=folder, split='test'))
  assert len(test) == 3 and test.image_shape == (32, 32, 3)
  # 28 -> 32 is a zero pad: pixels unchanged.
  np.testing.assert_array_equal(test.images[:, 2:30, 2:30, 1], arrays['t10k'][0])
  assert not test.images[:, :2].any() and not test.images[:, :, 30:].any()
  assert data.fashion_mnist('train', folder, image_size=16).image_shape == (16, 16, 1)


def test_fashion_mnist_missing_folder(tmp_path):
  with pytest.raises(errors.DatasetNotFoundError, match='apt-get install dataset-fashion-mnist') as info:
    data.load_source(_config(name='fashion_mnist', image_size=28, data_dir=str(tmp_path / 'nowhere')))
  assert str(tmp_path / 'nowhere') in str(info.value)
  assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------------
# Batches.


def test_batch_structure_and_values(digits16):
  b = _batches(digits16, global_batch_size=32)
  batch = b.get(7)
  assert batch['image'].shape == (1, 32, 16, 16, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (1, 32) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  index, flip = b.indices(7)
  assert not flip.any()
  np.testing.assert_array_equal(batch['image'][0], digits16.images[index[0]] / np.float32(127.5) - 1)
  np.testing.assert_array_equal(batch['label'][0], digits16.labels[index[0]])
  assert 'global batch 32' in b.describe()


def test_determinism_and_resume(digits16):
  b = _batches(digits16, seed=3)
  first = b.get(40)
  np.testing.assert_array_equal(b.get(40)['image'], first['image'])
  three = b.get(40, 3)
  for key in ('image', 'label'):
    np.testing.assert_array_equal(three[key], np.concatenate([b.get(s)[key] for s in (40, 41, 42)]))
  # A fresh object (a resumed run) that starts at step 41 sees what the uninterrupted run saw.
  resumed = _batches(digits16, seed=3)
  np.testing.assert_array_equal(resumed.get(41, 2)['image'], three['image'][1:])
  np.testing.assert_array_equal(resumed.get(40)['label'], first['label'])
  other = _batches(digits16, seed=4)
  assert not np.array_equal(other.get(40)['label'], first['label'])


@pytest.mark.parametrize('batch_size', [64, 100])
def test_every_example_once_per_epoch(digits16, batch_size):
  b = _batches(digits16, global_batch_size=batch_size, seed=1)
  n = len(digits16)
  num_steps = -(-2 * n // batch_size)
  index = b.indices(0, num_steps)[0].reshape(-1)
  epoch0, epoch1 = index[:n], index[n:2 * n]
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
  assert not np.array_equal(epoch0, epoch1)  # each epoch is shuffled anew


def test_processes_split_the_global_batch(digits16):
  whole = _batches(digits16, global_batch_size=16, seed=5)
  parts = [_batches(digits16, global_batch_size=16, seed=5, process_index=p, process_count=2) for p in (0, 1)]
  assert parts[0].local_batch_size == 8
  got = [p.get(11, 2) for p in parts]
  want = whole.get(11, 2)
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([g[key] for g in got], axis=1), want[key])
  index = [p.indices(11, 2)[0] for p in parts]
  for s in range(2):
    assert not set(index[0][s]) & set(index[1][s])
  with pytest.raises(ValueError, match='multiple of the process count'):
    _batches(digits16, global_batch_size=15, process_index=0, process_count=2)


def test_default_process_is_jax_process(digits16):
  b = data.Batches(digits16, global_batch_size=8, seed=0)
  assert (b.process_index, b.process_count) == (0, 1)


def test_random_flip(digits16):
  plain = _batches(digits16, seed=2)
  flipped = _batches(digits16, seed=2, random_flip=True)
  np.testing.assert_array_equal(plain.indices(5, 10)[0], flipped.indices(5, 10)[0])
  a = plain.get(5, 10)['image'].reshape((-1, 16, 16, 1))
  b = flipped.get(5, 10)['image'].reshape((-1, 16, 16, 1))
  flip = flipped.indices(5, 10)[1].reshape(-1)
  assert 0.35 < flip.mean() < 0.65
  np.testing.assert_array_equal(b[flip], a[flip][:, :, ::-1])
  np.testing.assert_array_equal(b[~flip], a[~flip])
  assert not np.array_equal(b[flip], a[flip])  # digits are not symmetric
  # The flip of a position is fixed by (seed, position), like its example.
  np.testing.assert_array_equal(_batches(digits16, seed=2, random_flip=True).get(7)['image'], b[2 * 64:3 * 64][None])


def test_streaming_matches_in_memory(digits16):
  in_memory = _batches(digits16, seed=9, random_flip=True)

  class Indexed(data.Source):
    """A source with only __getitem__, like a TFDS data source."""
    name, split, image_shape, num_classes = 'indexed', 'train', digits16.image_shape, 10

    def __len__(self):
      return len(digits16)

    def __getitem__(self, i):
      return digits16[i]

  streamed = _batches(Indexed(), seed=9, random_flip=True, in_memory=False, num_threads=3)
  assert not streamed.in_memory and 'threads' in streamed.describe()
  for key in ('image', 'label'):
    np.testing.assert_array_equal(streamed.get(30, 2)[key], in_memory.get(30, 2)[key])
  assert data.materialize(Indexed()).images.shape == digits16.images.shape


def test_iterate_prefetches_the_same_batches(digits16):
  b = _batches(digits16, seed=4, random_flip=True)
  with b.iterate(5, 2, stop_step=10) as it:
    got = list(it)
  want = [b.get(5, 2), b.get(7, 2), b.get(9, 1)]
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(g[key], w[key])
  # Endless form: take a few and stop the thread.
  it = b.iterate(100, 3, prefetch=4)
  for k in range(3):
    np.testing.assert_array_equal(next(it)['label'], b.get(100 + 3 * k, 3)['label'])
  it.close()
  assert not it._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(it)


def test_iterate_reports_errors(digits16):
  b = _batches(digits16)
  with pytest.raises(ValueError, match='step'):
    next(iter(b.iterate(-5)))


def test_load_batches(digits16):
  b = data.load_batches(_config(random_flip=True), global_batch_size=8, seed=0, process_index=1, process_count=2)
  assert b.random_flip and b.local_batch_size == 4 and b.get(0)['image'].shape == (1, 4, 16, 16, 1)


# ---------------------------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path, monkeypatch):
  def no_network(*args):
    raise AssertionError(f'a missing dataset must not be downloaded: connect{args}')
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  with pytest.raises(errors.DatasetNotFoundError) as info:
    data.load_source(_config(name='cifar10', image_size=32, channels=3, data_dir=str(tmp_path)))
  message = str(info.value)
  for needle in ("'cifar10'", str(tmp_path), "download_and_prepare(file_format='array_record')", 'manual_dir',
                 'cifar-10-binary.tar.gz'):
    assert needle in message, needle
  # The default data_dir is TFDS_DATA_DIR (the conftest's nonexistent folder).
  with pytest.raises(errors.DatasetNotFoundError, match='imagenet_resized/64x64') as info:
    data.load_source(_config(name='imagenet64', image_size=64, channels=3, split='test'))
  assert os.environ['TFDS_DATA_DIR'] in str(info.value) and "'validation'" in str(info.value)


def test_tfds_tfrecord_only_is_explained(tmp_path):
  folder = tmp_path / 'cifar10' / '3.0.2'
  folder.mkdir(parents=True)
  (folder / 'dataset_info.json').write_text('{}')
  (folder / 'cifar10-train.tfrecord-00000-of-00001').write_text('')
  with pytest.raises(errors.DatasetNotFoundError, match='tfrecord'):
    data.tfds_source('cifar10', 'train', str(tmp_path))


def _fake_prepared(data_dir, tfds_name, version, split):
  """The files our check looks for; the records themselves come from tfds' mock."""
  folder = os.path.join(data_dir, tfds_name, version)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'dataset_info.json'), 'w') as f:
    f.write('{}')
  base = tfds_name.split('/')[0]
  with open(os.path.join(folder, f'{base}-{split}.array_record-00000-of-00001'), 'w') as f:
    f.write('')


def test_tfds_cifar10_reads_without_tensorflow(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets', reason='tensorflow-datasets is not installed')
  mock = lambda: tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE)
  try:  # tfds' own mock first, so that a failure of our code is never mistaken for an unusable mock
    with mock():
      tfds.data_source('cifar10', split='train', download=False)[0]  # pylint: disable=expression-not-assigned
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f'tfds mock data unusable here (e.g. a tfds release whose mock needs TensorFlow): {e!r}')
  _fake_prepared(str(tmp_path), 'cifar10', '3.0.2', 'train')
  _fake_prepared(str(tmp_path), 'fashion_mnist', '3.0.1', 'test')
  with mock():
    src = data.load_source(_config(name='cifar10', image_size=32, channels=3, data_dir=str(tmp_path)))
    fashion = data.load_source(_config(name='fashion_mnist_tfds', image_size=32, channels=1, data_dir=str(tmp_path),
                                       split='test'))
    example = src[3]
    streamed = _batches(src, global_batch_size=4, seed=0, random_flip=True, in_memory=False, num_threads=2)
    streamed_batch = streamed.get(2, 3)
    # Small TFDS datasets are read into memory once; their batches equal the streamed ones.
    in_memory = _batches(src, global_batch_size=4, seed=0, random_flip=True)
    with pytest.raises(errors.DataError, match='model.image_size=32, model.channels=3'):
      data.load_source(_config(name='cifar10', image_size=16, channels=3, data_dir=str(tmp_path)))
  assert isinstance(src, data.TfdsSource) and len(src) == 12
  assert src.image_shape == (32, 32, 3) and src.num_classes == 10 and 'cifar10' in src.describe()
  assert example['image'].shape == (32, 32, 3) and example['image'].dtype == np.uint8
  assert 0 <= example['label'] < 10
  assert in_memory.in_memory and not streamed.in_memory
  for key in ('image', 'label'):
    np.testing.assert_array_equal(in_memory.get(2, 3)[key], streamed_batch[key])
  assert fashion.image_shape == (32, 32, 1) and len(fashion) == 12


def test_tfds_missing_package_is_explained(tmp_path, monkeypatch):
  _fake_prepared(str(tmp_path), 'cifar10', '3.0.2', 'train')
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # makes `import tensorflow_datasets` fail
  with pytest.raises(ImportError, match='pip install tensorflow-datasets'):
    data.tfds_source('cifar10', 'train', str(tmp_path))
