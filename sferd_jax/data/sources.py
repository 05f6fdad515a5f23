"""Random-access image sources: the embedded digits, Fashion-MNIST, TFDS array_record datasets and .npz files.

A source has `len(src)`, `src[i] -> {'image': uint8 (H, W, C), 'label': int32}`, `image_shape`, `num_classes`,
`name`, `split`, and `read(indices) -> (images, labels)` for many examples at once. Nothing here downloads:
a missing dataset raises `DatasetNotFoundError` with the commands that prepare it.
"""

import concurrent.futures
import gzip
import os
import re
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np

from sferd_jax import errors
from sferd_jax import files

DATA_CONFIG_KEYS = ('name', 'image_size', 'channels', 'data_dir', 'random_flip', 'split', 'path')
SOURCE_NAMES = ('digits', 'fashion_mnist', 'fashion_mnist_tfds', 'cifar10', 'imagenet64', 'npz')
# The splits each source has; TFDS sources also take slices ('train[:10%]'); an npz file has one, named freely.
SPLITS = {'digits': ('train', 'all'), 'fashion_mnist': ('train', 'test'), 'fashion_mnist_tfds': ('train', 'test'),
          'cifar10': ('train', 'test'), 'imagenet64': ('train', 'validation', 'test')}

# Where Debian's `dataset-fashion-mnist` package puts the idx files (`dpkg -L dataset-fashion-mnist`).
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_URL = 'https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)'

# config name -> (TFDS name, image shape, num_classes, split aliases). imagenet_resized has no 'test' split.
TFDS_DATASETS = {
    'cifar10': ('cifar10', (32, 32, 3), 10, {}),
    'imagenet64': ('imagenet_resized/64x64', (64, 64, 3), 1000, {'test': 'validation'}),
    'fashion_mnist_tfds': ('fashion_mnist', (28, 28, 1), 10, {}),
}

# Files a user can put in a `manual_dir` so that TFDS prepares a dataset without network
# (names and sizes from tensorflow_datasets' url_checksums).
_MANUAL_FILES = {
    'cifar10': 'cifar-10-binary.tar.gz (170,052,171 bytes, from https://www.cs.toronto.edu/~kriz/)',
    'imagenet_resized/64x64': ('Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and '
                               'Imagenet64_val_npz.zip (14 GB, from https://image-net.org/download-images, '
                               'login required)'),
    'fashion_mnist': ('train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and '
                      f't10k-labels-idx1-ubyte.gz (e.g. from {FASHION_MNIST_DIR} after '
                      '`apt-get install dataset-fashion-mnist`)'),
}


class Source:
  """Random access to (image, label) examples of one split."""

  name: str
  split: str
  image_shape: tuple[int, int, int]
  num_classes: int

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    raise NotImplementedError

  @property
  def nbytes(self) -> int:
    """Size of all images as uint8, to decide whether to hold them in memory."""
    return len(self) * int(np.prod(self.image_shape))

  def read(self, indices, num_threads=1):
    """Examples `indices` as (uint8 (n, H, W, C), int32 (n,)), read by `num_threads` threads."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    images = np.empty((len(indices),) + tuple(self.image_shape), np.uint8)
    labels = np.empty((len(indices),), np.int32)

    def read_chunk(lo, hi):
      for k in range(lo, hi):
        example = self[int(indices[k])]
        images[k] = example['image']
        labels[k] = example['label']

    # Contiguous chunks, one per thread: few futures, and the decoders (PIL, array_record) release the GIL.
    bounds = np.linspace(0, len(indices), max(1, min(num_threads, len(indices))) + 1).astype(int)
    if len(bounds) <= 2:
      read_chunk(0, len(indices))
    else:
      with concurrent.futures.ThreadPoolExecutor(len(bounds) - 1) as pool:
        for future in [pool.submit(read_chunk, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
          future.result()
    return images, labels

  def describe(self) -> str:
    h, w, c = self.image_shape
    return f'{self.name}[{self.split}]: {len(self)} examples of {h}x{w}x{c}, {self.num_classes} classes'

  def __repr__(self):
    return f'<{type(self).__name__} {self.describe()}>'


class ArraySource(Source):
  """Images held in memory as one uint8 array; `read` is a fancy-indexing gather."""

  def __init__(self, images, labels=None, *, name='array', split='train', num_classes=None):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f'images must be uint8 (N, H, W, C) or (N, H, W), got {images.dtype} {images.shape}')
    if labels is None:
      labels = np.zeros((len(images),), np.int32)  # unlabelled data: one class
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    if len(labels) and labels.min() < 0:
      raise ValueError('labels must be >= 0')
    self.images = images
    self.labels = labels.astype(np.int32)
    self.name = name
    self.split = split
    self.image_shape = tuple(int(d) for d in images.shape[1:])
    self.num_classes = int(num_classes if num_classes is not None else (self.labels.max() + 1 if len(labels) else 1))

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': self.labels[index]}

  def read(self, indices, num_threads=1):
    del num_threads  # a memory gather is fast enough in one thread
    indices = np.asarray(indices, np.int64).reshape(-1)
    return self.images[indices], self.labels[indices]

  def describe(self):
    return super().describe() + ' (in memory)'


def materialize(source: Source, num_threads: int = 16, chunk: int = 4096) -> ArraySource:
  """Reads a whole source into memory once (cifar10 is 150 MB), so that batches are gathers."""
  if isinstance(source, ArraySource):
    return source
  logging.info('Reading %s into memory (%.0f MB)', source.describe(), source.nbytes / 2**20)
  images = np.empty((len(source),) + tuple(source.image_shape), np.uint8)
  labels = np.empty((len(source),), np.int32)
  for lo in range(0, len(source), chunk):
    hi = min(lo + chunk, len(source))
    images[lo:hi], labels[lo:hi] = source.read(np.arange(lo, hi), num_threads=num_threads)
  return ArraySource(images, labels, name=source.name, split=source.split, num_classes=source.num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Resizing.


def resize_images(images, size: int):
  """uint8 (N, H, W, C) -> uint8 (N, size, size, C), bicubic in float (PIL antialiases when shrinking)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((len(images), size, size, images.shape[-1]), np.float32)
  for n in range(len(images)):
    for c in range(images.shape[-1]):
      # Mode 'F' keeps the interpolation in float; rounding happens once, below.
      plane = Image.fromarray(images[n, :, :, c].astype(np.float32), mode='F')
      out[n, :, :, c] = np.asarray(plane.resize((size, size), Image.Resampling.BICUBIC))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _fit(images, image_size, channels, what):
  """Pads 28 -> 32 (the usual MNIST-to-32 convention, pixels unchanged), else resizes; tiles 1 -> 3 channels."""
  if channels not in (1, 3):
    raise ValueError(f'{what}: channels must be 1 or 3, got {channels}')
  h = images.shape[1]
  if h == 28 and image_size == 32:
    images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  else:
    images = resize_images(images, image_size)
  if channels == 3 and images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images


# ----------------------------------------------------------------------------------------------------------------
# Embedded digits.


def digits(image_size: int = 16, channels: int = 1, split: str = 'train') -> ArraySource:
  """scikit-learn's bundled 1,797 8x8 digits (0..16), as uint8 0..255 resized to image_size. No download."""
  if split not in ('train', 'all'):
    raise ValueError(f"digits has a single split of 1,797 images: use split='train', got {split!r}")
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('The embedded digits dataset needs scikit-learn: pip install scikit-learn') from e
  bunch = datasets.load_digits()
  images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  images = _fit(images, image_size, channels, 'digits')
  return ArraySource(images, bunch.target, name='digits', split=split, num_classes=10)


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from idx files (Debian's dataset-fashion-mnist).

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def read_idx(path: str) -> np.ndarray:
  """Parses an idx file (LeCun's MNIST format), gzipped or not."""
  data = files.read_bytes(path)
  if path.endswith('.gz'):
    data = gzip.decompress(data)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an idx file (magic bytes {data[:4]!r})')
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f'{path}: header says {shape} of {dtype} but the file holds {len(data) - offset} bytes')
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder('='))


def _find_idx(folder, stem):
  for candidate in (stem + '.gz', stem):
    if files.isfile(os.path.join(folder, candidate)):
      return os.path.join(folder, candidate)
  return None


def fashion_mnist(split: str = 'train', data_dir: Optional[str] = None, image_size: int = 28,
                  channels: int = 1) -> ArraySource:
  """Fashion-MNIST (60,000 train / 10,000 test, 28x28x1) from idx files; 28 -> 32 pads, other sizes resize."""
  folder = data_dir or FASHION_MNIST_DIR
  prefix = {'train': 'train', 'test': 't10k'}.get(split)
  if prefix is None:
    raise ValueError(f"fashion_mnist splits are 'train' and 'test', got {split!r}")
  stems = (f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte')
  paths = [_find_idx(folder, stem) for stem in stems]
  if None in paths:
    raise errors.DatasetNotFoundError(
        f'Fashion-MNIST {split!r} not found: {folder} has no {stems[0]}[.gz] and {stems[1]}[.gz].\n'
        f'  On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist   (installs them in {FASHION_MNIST_DIR})\n'
        f'  Or put the four idx .gz files from {FASHION_MNIST_URL} in a folder and set data.data_dir to it.')
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
    raise ValueError(f'Unexpected Fashion-MNIST arrays: images {images.dtype} {images.shape}, labels {labels.shape}')
  images = _fit(images[..., None], image_size, channels, 'fashion_mnist')
  return ArraySource(images, labels, name='fashion_mnist', split=split, num_classes=10)


# ----------------------------------------------------------------------------------------------------------------
# A user's .npz file.


def check_split(name, split):
  """Raises ValueError when source `name` has no split `split` (or `name` is unknown)."""
  if name not in SOURCE_NAMES:
    raise ValueError(f'unknown data.name {name!r}; known: {SOURCE_NAMES}')
  base = split.split('[')[0] if name in TFDS_DATASETS else split
  if name in SPLITS and base not in SPLITS[name]:
    raise ValueError(f'{name} has no split {split!r}; its splits are {SPLITS[name]}'
                     + (" (and slices such as 'train[:10%]')" if name in TFDS_DATASETS else ''))


NPZ_FORMAT = ("'images' uint8 (N, H, W, C) or (N, H, W) with N >= 1, optionally 'labels' (N,) of ints >= 0 and "
              "'num_classes' (a scalar int above every label)")


def npz(path: str, split: str = 'train') -> ArraySource:
  """`images` uint8 (N, H, W, C) and optional `labels` (N,) (and optional scalar `num_classes`).

  Every defect of the file is an errors.DataError that names it and the format expected.
  """
  if not path or not files.isfile(path):
    raise errors.DatasetNotFoundError(f'npz dataset: no file at data.path={path!r}; it must hold {NPZ_FORMAT}')

  def defect(what):
    return errors.DataError(f'{path}: {what}. An npz dataset holds {NPZ_FORMAT}.')

  with files.open_file(path, 'rb') as f:
    if f.read(4) != b'PK\x03\x04':  # numpy would take anything else for a pickle
      raise defect('cannot be read as an .npz (it is not a zip archive; write it with np.savez)')
  try:
    with files.load_npz(path) as f:  # never unpickle a data file
      arrays = {k: f[k] for k in f.keys()}
  except ValueError as e:  # numpy refuses object arrays without allow_pickle
    raise defect(f'holds an array of Python objects, which is never loaded ({e})') from None
  except Exception as e:  # pylint: disable=broad-except  (not a zip, truncated, not an npz at all)
    raise defect(f'cannot be read as an .npz ({type(e).__name__}: {e})') from None
  if 'images' not in arrays:
    raise defect(f"has no 'images' array (its arrays: {sorted(arrays)})")
  images, labels = arrays['images'], arrays.get('labels')
  if images.dtype != np.uint8:
    hint = ' (from floats in [0, 1]: (x * 255).round().astype(np.uint8))' if images.dtype.kind == 'f' else ''
    raise defect(f"'images' are {images.dtype}, not uint8{hint}")
  if images.ndim not in (3, 4) or not len(images) or 0 in images.shape:
    raise defect(f"'images' have shape {images.shape}; need (N, H, W, C) or (N, H, W) with no empty axis")
  if labels is not None:
    if labels.dtype.kind not in 'iu' or labels.shape != (len(images),):
      raise defect(f"'labels' are {labels.dtype} {labels.shape}; need ints of shape ({len(images)},)")
    if labels.min() < 0:
      raise defect(f"'labels' go down to {labels.min()}; they must be >= 0")
  num_classes = None
  if 'num_classes' in arrays:
    value = arrays['num_classes']
    if value.shape != () or value.dtype.kind not in 'iu':
      raise defect(f"'num_classes' is {value.dtype} {value.shape}; need a scalar int")
    num_classes = int(value)
    if labels is not None and num_classes <= labels.max():
      raise defect(f"'num_classes' is {num_classes} but a label is {labels.max()}")
  name = os.path.splitext(os.path.basename(path))[0]
  return ArraySource(images, labels, name=f'npz:{name}', split=split, num_classes=num_classes)


# ----------------------------------------------------------------------------------------------------------------
# TFDS array_record datasets, read without TensorFlow.


def default_tfds_data_dir() -> str:
  """Where TFDS looks when no data_dir is given."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def _version_key(version):
  return tuple(int(p) for p in version.split('.'))


def _prepared_version(data_dir, tfds_name, split):
  """The newest version folder holding dataset_info.json and array_record files of `split`, and why not if none.

  TFDS itself, asked for data that is not there, says 'file format TFRECORD is not supported', which sends users
  the wrong way; looking for the files first gives a message that says what to do.
  """
  root = os.path.join(data_dir, tfds_name)
  versions = sorted((v for v in files.listdir(root) if re.fullmatch(r'\d+\.\d+\.\d+', v)), key=_version_key,
                    reverse=True)
  base_split = split.split('[')[0]  # 'train[:10%]' reads the train files
  why = f'no {root}/<version>/dataset_info.json'
  for version in versions:
    folder = os.path.join(root, version)
    if not files.isfile(os.path.join(folder, 'dataset_info.json')):
      continue
    if files.glob(folder, f'*-{base_split}.array_record*'):
      return version, None
    if files.glob(folder, f'*-{base_split}.tfrecord*'):
      why = (f'{folder} holds {base_split!r} as tfrecord, which cannot be read without TensorFlow; prepare it '
             "again with file_format='array_record' (in another data_dir, or after deleting that folder)")
    else:
      why = f'{folder} has no {base_split!r} split files (*-{base_split}.array_record-*)'
  return None, why


def tfds_not_found_message(tfds_name, split, data_dir, why):
  prepare = f"tfds.builder('{tfds_name}', data_dir='{data_dir}').download_and_prepare(file_format='array_record'"
  return (
      f'TFDS dataset {tfds_name!r} (split {split!r}) is not prepared in data_dir {data_dir!r}: {why}.\n'
      'sferd_jax never downloads. Prepare it once on a machine with TensorFlow and network:\n'
      '  pip install tensorflow-cpu tensorflow-datasets importlib_resources\n'
      f'  python -c "import tensorflow_datasets as tfds; {prepare})"\n'
      f'then copy {os.path.join(data_dir, tfds_name.split("/")[0])} here (reading needs no TensorFlow), or point '
      'data.data_dir / TFDS_DATA_DIR at the folder that holds it.\n'
      f'Offline (TensorFlow still needed): put {_MANUAL_FILES[tfds_name]} in a folder M and run\n'
      f'  python -c "import tensorflow_datasets as tfds; {prepare}, '
      "download_config=tfds.download.DownloadConfig(manual_dir='M'))\"")


class TfdsSource(Source):
  """A prepared TFDS dataset read with `tfds.data_source` (array_record): random access, no TensorFlow."""

  def __init__(self, tfds_name: str, split: str = 'train', data_dir: Optional[str] = None, *, name=None):
    data_dir = os.path.expanduser(data_dir) if data_dir else default_tfds_data_dir()
    version, why = _prepared_version(data_dir, tfds_name, split)
    if version is None:
      raise errors.DatasetNotFoundError(tfds_not_found_message(tfds_name, split, data_dir, why))
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'Reading the TFDS dataset {tfds_name!r} needs tensorflow-datasets (not TensorFlow): '
                        'pip install tensorflow-datasets importlib_resources array_record') from e
    # The version found on disk, so that data prepared by another tfds release still reads.
    self._ds = tfds.data_source(f'{tfds_name}:{version}', split=split, data_dir=data_dir, download=False)
    features = self._ds.dataset_info.features
    self.name = name or tfds_name
    self.split = split
    self.data_dir = data_dir
    self.version = version
    self.image_shape = tuple(int(d) for d in features['image'].shape)
    self.num_classes = int(features['label'].num_classes)

  def __len__(self):
    return len(self._ds)

  def __getitem__(self, index):
    example = self._ds[int(index)]
    return {'image': np.asarray(example['image'], np.uint8), 'label': np.int32(example['label'])}

  def describe(self):
    return super().describe() + f' (tfds {self.version} in {self.data_dir})'


def tfds_source(name: str, split: str = 'train', data_dir: Optional[str] = None) -> TfdsSource:
  """'cifar10', 'imagenet64' or 'fashion_mnist_tfds' (names as in the data config) from prepared TFDS data."""
  if name not in TFDS_DATASETS:
    raise ValueError(f'Unknown TFDS dataset {name!r}; known: {sorted(TFDS_DATASETS)}')
  tfds_name, _, _, aliases = TFDS_DATASETS[name]
  return TfdsSource(tfds_name, aliases.get(split, split), data_dir, name=name)


# ----------------------------------------------------------------------------------------------------------------
# Config dispatch.


def _read_config(data_config: Any) -> dict[str, Any]:
  """Every key of the data config (an ml_collections ConfigDict or a mapping)."""
  missing = [k for k in DATA_CONFIG_KEYS if k not in data_config]
  if missing:
    raise KeyError(f'data config lacks {missing}; it needs exactly {DATA_CONFIG_KEYS}')
  return {k: data_config[k] for k in DATA_CONFIG_KEYS}


def _check_shape(source: Source, image_size: int, channels: int):
  want = (image_size, image_size, channels)
  if tuple(source.image_shape) != want:
    raise errors.DataError(f'{source.describe()}, but the config asks for image_size={image_size}, '
                           f'channels={channels}. Set model.image_size={source.image_shape[0]}, '
                           f'model.channels={source.image_shape[2]} (only digits and fashion_mnist are resized).')


def load_source(data_config: Mapping[str, Any], split: Optional[str] = None) -> Source:
  """The source that `data_config` names, with images of shape (image_size, image_size, channels).

  split=None reads data_config.split. digits and fashion_mnist are resized to the config; the others must match.
  """
  cfg = _read_config(data_config)
  name, image_size, channels = cfg['name'], int(cfg['image_size']), int(cfg['channels'])
  split = split or cfg['split']
  data_dir = cfg['data_dir']
  if name == 'digits':
    source = digits(image_size, channels, split)
  elif name == 'fashion_mnist':
    source = fashion_mnist(split, data_dir, image_size, channels)
  elif name == 'fashion_mnist_tfds':
    # 55 MB: read it whole, then pad/resize like the idx version.
    source = materialize(tfds_source(name, split, data_dir))
    source = ArraySource(_fit(source.images, image_size, channels, name), source.labels, name=name, split=split,
                         num_classes=source.num_classes)
  elif name in TFDS_DATASETS:
    source = tfds_source(name, split, data_dir)
  elif name == 'npz':
    source = npz(cfg['path'], split)
  else:
    raise ValueError(f'Unknown data.name {name!r}; known: {SOURCE_NAMES}')
  _check_shape(source, image_size, channels)
  return source

