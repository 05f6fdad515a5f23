"""The latent phase's data: the semantic code E_phi(x0) of every training image, and batches of them."""

import numpy as np

from sferd_jax.data import pipeline
from sferd_jax.data import sources
from sferd_jax import images as images_lib


class CodeBatches(pipeline.Batches):
  """Batches of semantic codes (N, latent_dim) in 'image' and their images' labels (N,) in 'label' (zeros when
  labels=None), with Batches' resumable per-process order."""

  def __init__(self, codes, *, global_batch_size, seed, labels=None):
    super().__init__(sources.ArraySource(np.zeros((len(codes), 1, 1, 1), np.uint8)),
                     global_batch_size=global_batch_size, seed=seed)
    self.codes = np.asarray(codes, np.float32)
    self.labels = np.zeros(len(codes), np.int32) if labels is None else np.asarray(labels, np.int32)
    if self.labels.shape != (len(self.codes),):
      raise ValueError(f'CodeBatches: labels must have shape ({len(self.codes)},), got {self.labels.shape}')

  def get(self, step, num_steps=1):
    index, _ = self.indices(step, num_steps)
    return {'image': self.codes[index], 'label': self.labels[index]}


def encode_dataset(source, encode, *, batch_size=256):
  """encode(images in [-1, 1]) of every image of a source, and its labels: ((N, latent_dim) float32, (N,) int32).

  Reads the images a batch at a time (ImageNet-64 would be 16 GB at once); the last batch is padded to the same
  shape, so one compilation of encode serves all.
  """
  codes, labels = [], []
  for start in range(0, len(source), batch_size):
    indices = np.arange(start, min(start + batch_size, len(source)))
    images, batch_labels = source.read(np.pad(indices, (0, batch_size - len(indices)), mode='edge'),
                                       num_threads=16)
    codes.append(np.asarray(encode(images_lib.from_uint8(images)))[:len(indices)])
    labels.append(np.asarray(batch_labels, np.int32)[:len(indices)])
  return np.concatenate(codes), np.concatenate(labels)
