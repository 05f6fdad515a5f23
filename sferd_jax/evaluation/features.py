"""The feature-function contract shared by the Inception and the small classifier.

A feature fn takes uint8 images (N, H, W[, C]) in [0, 255] and returns NumPy float32 {'pool': (N, D)[,
'logits': (N, K)]}; its `extractor` attribute names the network and its weights (for reference statistics).
Samples in [-1, 1] are quantised first, as EDM/StyleGAN do: uint8(clip(round((x + 1) * 127.5), 0, 255)).
"""

import jax
import numpy as np


def batched_feature_fn(apply_fn, params, *, batch_size, extractor):
  """Wraps apply_fn(params, uint8 batch) -> dict into a feature fn over any N, in jitted fixed-size batches."""
  apply = jax.jit(apply_fn)

  def fn(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise TypeError(f'images must be uint8 in [0, 255], got {images.dtype}; quantise [-1, 1] samples with '
                      'uint8(clip(round((x + 1) * 127.5), 0, 255))')
    n = images.shape[0]
    if n == 0:
      raise ValueError('no images given')
    outs = []
    for start in range(0, n, batch_size):
      batch = images[start:start + batch_size]
      pad = batch_size - batch.shape[0]
      if pad:  # A padded last batch reuses the compiled shape.
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
      outs.append(jax.device_get(apply(params, batch)))
    return {k: np.concatenate([o[k] for o in outs])[:n].astype(np.float32) for k in outs[0]}

  fn.extractor = extractor
  return fn
