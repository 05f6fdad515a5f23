"""Data: the embedded digits, Fashion-MNIST, TFDS array_record sources and npz files; resumable batches.

  source = load_source(config.data)   # or digits(16), fashion_mnist(...), npz(path), tfds_source('cifar10')
  batches = Batches(source, global_batch_size=128, seed=0, random_flip=True)   # this process's slice
  batch = batches.get(step)   # {'image': f32 (1, B_local, H, W, C) in [-1, 1], 'label': i32 (1, B_local)}
"""

from sferd_jax.data.pipeline import Batches
from sferd_jax.data.pipeline import data_config
from sferd_jax.data.pipeline import load_batches
from sferd_jax.data.pipeline import Prefetcher
from sferd_jax.data.sources import ArraySource
from sferd_jax.data.sources import DATA_CONFIG_KEYS
from sferd_jax.data.sources import digits
from sferd_jax.data.sources import fashion_mnist
from sferd_jax.data.sources import load_source
from sferd_jax.data.sources import materialize
from sferd_jax.data.sources import npz
from sferd_jax.data.sources import read_idx
from sferd_jax.data.sources import Source
from sferd_jax.data.sources import SOURCE_NAMES
from sferd_jax.data.sources import tfds_source
from sferd_jax.data.sources import TfdsSource
