r"""Imports a checkpoint of progressive distillation (PD) as an exported sferd_jax model.

  python -m sferd_jax.tools.import_pd cifar_original runs/pd/cifar10_teacher --preset=cifar10
  python -m sferd_jax.main --config=cifar10_stage --workdir=runs/cifar10 \
      --config.distill.teacher=runs/pd/cifar10_teacher

PD (google-research/google-research, diffusion_distillation/) publishes Flax checkpoints in a Cloud Storage bucket,
gs://gresearch/diffusion-distillation (its configs name the teachers `cifar_original` and `imagenet_original`, its
notebook loads the 8-step ImageNet student `imagenet_8`). The argument is such a file, or a folder of PD's
`checkpoint_<step>` files (the one with the highest step is taken). Nothing is downloaded: fetch the file first.

What is read. A PD checkpoint is `flax.serialization.to_bytes(TrainState)` (model.py: TrainState(step, optimizer,
ema_params, num_sample_steps); checkpoints.py writes `checkpoint_<step>`), i.e. msgpack of the state dict
  {'step', 'optimizer': {'target': params, 'state': ...}, 'ema_params': params, 'num_sample_steps'}.
It is read with flax.serialization.msgpack_restore (no TensorFlow, no target). The parameters taken are
'ema_params', what PD itself samples and distils from (model.py load_teacher_state, the notebook). Without them the
raw weights 'optimizer'/'target' are taken (said on stderr and recorded in model.json), or, for a file that holds
a bare parameter tree (top-level 'conv_in'), that tree; --params_key picks one explicitly. The step count the model
samples with is --num_steps, else the checkpoint's num_sample_steps when > 0 (a distilled student's, as PD's
loader does), else the preset's (PD's start_num_steps: 8192 for CIFAR-10, 1024 for ImageNet 64).

The tree PD's unet.UNet makes (l = level, 0 at full resolution; i = block; r = image_size // 2**l) and ours:

  PD (ema_params/...)                    ours (params/...)
  dense0, dense1, conv_in                encoder/dense0, encoder/dense1, encoder/conv_in
  class_emb {kernel, bias}               encoder/class_emb {embedding = kernel + bias}
  down_{l}.block_{i}                     encoder/enc{r}_{i}
  down_{l}.attn_{i}                      encoder/enc{r}_{i}_attn
  down_{l}.downsample                    encoder/enc{r}_down        (a ResnetBlock, or a Conv without resblock_resample)
  mid.block_1, mid.attn_1, mid.block_2   decoder/mid_0, decoder/mid_attn, decoder/mid_1
  up_{l}.block_{i}   (i <= nrb)          decoder/dec{r}_{i}
  up_{l}.attn_{i}                        decoder/dec{r}_{i}_attn
  up_{l}.upsample                        decoder/dec{r}_up
  norm_out, conv_out                     decoder/norm_out, decoder/conv_out

Inside a block the names are the same: ResnetBlock {norm1, conv1, temb_proj, norm2, conv2, nin_shortcut},
AttnBlock {norm, q, k, v, proj_out}, leaves {kernel, bias} or GroupNorm's {scale, bias}; every shape is the same.

Read from the tree: channels and ch (conv_in), emb_ch (dense0), the levels, num_res_blocks and ch_mult (the
down_{l}.block_{i} and their conv1 widths), resblock_resample (whether down_0.downsample is a ResnetBlock),
which levels attend, the heads of each attention block (q's kernel (C, heads, head_dim)), num_classes (class_emb)
and the output channels (conv_out). Not in the tree, so from flags or --preset (PD's config/*_base.py settings):
image_size (the tree is the same at any resolution; it names our blocks and turns attending levels into
attn_resolutions), output_type (PD's mean_type; 2C output channels can only be 'both' here), num_heads/head_dim
when attention kernels are stored flattened, or to choose between two settings that give the same heads, and
num_steps. A tree that does not fit is refused with a CheckpointError naming the path where it stopped.

Every difference between PD's net and ours, and what the import does about it:
- Names and nesting: the table above.
- Class embedding: PD adds Dense(one_hot(y)) = kernel[y] + bias; ours nn.Embed, so embedding = kernel + bias, which
  is exact (the one-hot product selects the row without rounding, and the sum is the same float32 addition).
- Unconditional: PD's num_classes=1 (no class_emb; the label is ignored) is our num_classes=0.
- GroupNorm: PD always uses 32 groups, ours min(32, C // 4): the same for every C >= 128, which covers PD's
  published nets (C >= 192); a tree with a GroupNorm over fewer channels is refused, as the import would not be
  exact (PD's 32 groups need C to be a multiple of 32 anyway).
- Attention: PD calls flax's nn.dot_product_attention, ours jax.nn.dot_product_attention (or, when a map is
  captured, its own softmax): both softmax(q k^T / sqrt(head_dim)) v, the same up to float rounding.
- Attention parameters: DenseGeneral kernels (C, heads, head_dim), biases (heads, head_dim), proj_out (heads,
  head_dim, C), the layout third-party converters of the published files read (apple/ml-tract,
  teacher/download_and_convert_jax.py). PD's own loader reshapes every leaf to its model's shape ("fix possible
  flax version errors"), as some Flax versions stored DenseGeneral parameters flattened ((C, heads*head_dim), ...);
  flattened ones are reshaped the same way here, with the heads from --num_heads/--head_dim or the preset.
- Noise-level input: our net computes PD's logsnr_input_type='inv_cos' (every PD config uses it); a net trained
  with 'linear' or 'sigmoid' has the same tree and cannot be told apart: it would import, wrongly.
- Output: PD's mean_type x | eps | v | both is our output_type; 'both' is [x, eps] on the channel axis, mixed with
  weight sigmoid(-logsnr) on x in both. PD's learned log-variance outputs (logvar_type 'learned*'; no PD config uses
  them) are not supported: 2C output channels with --output_type x, eps or v are refused.
- Dropout acts in training only (recorded, not used by sampling); PD computes in float32, the import sets
  dtype='float32'. The noise schedule is PD's cosine log-SNR in [-20, 20], ours too (diffusion in model.json).
"""

import argparse
import os
import re
import sys

import numpy as np

from sferd_jax import config as config_lib
from sferd_jax import errors
from sferd_jax import files

BUCKET = 'gs://gresearch/diffusion-distillation'
PARAMS_KEYS = ('auto', 'ema_params', 'optimizer.target', 'none')
OUTPUT_TYPES = ('x', 'eps', 'v', 'both')

# PD's published settings (config/cifar_base.py, config/imagenet64_base.py, and their *_distill.py's
# start_num_steps); the architecture keys are checked against the tree, the rest fill what the tree does not say.
PRESETS = {
    'cifar10': dict(model=config_lib.CIFAR10_UNET, num_steps=8192, data_name='cifar10',
                    checkpoint=f'{BUCKET}/cifar_original'),
    'imagenet64': dict(model=config_lib.IMAGENET64_UNET, num_steps=1024, data_name='imagenet64',
                       checkpoint=f'{BUCKET}/imagenet_original'),
}
# Settings a preset gives that the tree cannot (or need not) say; the other model keys are checked against the tree.
UNINFERRED = ('image_size', 'output_type', 'num_heads', 'head_dim', 'dropout', 'dtype')

_CHECKPOINT_FILE = re.compile(r'^checkpoint_(\d+)$')
_MODULE_PATTERNS = (
    re.compile(r'^(conv_in|dense0|dense1|class_emb|norm_out|conv_out)$'),
    re.compile(r'^mid\.(block_1|attn_1|block_2)$'),
    re.compile(r'^(down|up)_(\d+)\.(block|attn)_(\d+)$'),
    re.compile(r'^down_(\d+)\.downsample$'),
    re.compile(r'^up_(\d+)\.upsample$'),
)
_ATTENTION_LEAVES = ('q', 'k', 'v', 'proj_out')


def _fail(message):
  raise errors.CheckpointError(message)


# Reading the checkpoint.


def find_checkpoint(path):
  """The checkpoint file: `path` itself, or a folder's checkpoint_<step> with the highest step. (file, step or None)."""
  path = files.absolute(path)
  if files.isdir(path):
    found = [(int(m.group(1)), name) for name in files.listdir(path)
             for m in [_CHECKPOINT_FILE.match(os.path.basename(name))] if m]
    if not found:
      _fail(f'{path} is a folder without checkpoint_<step> files: point at a PD checkpoint file (e.g. '
            f'cifar_original, fetched from {BUCKET}) or at the folder PD trained into')
    step, name = max(found)
    return os.path.join(path, os.path.basename(name)), step
  if not files.exists(path):
    _fail(f'{path} does not exist. Fetch a PD checkpoint first, e.g. `gsutil cp {BUCKET}/cifar_original .`')
  return path, None


def read_checkpoint(file):
  """The state dict of a PD checkpoint (flax msgpack), as nested dicts of numpy arrays."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  try:
    state = serialization.msgpack_restore(files.read_bytes(file))
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises several kinds)
    _fail(f'{file} is not a Flax msgpack checkpoint ({type(e).__name__}: {e}); PD checkpoints are written by '
          f'flax.serialization.to_bytes')
  if not isinstance(state, dict):
    _fail(f'{file} holds a {type(state).__name__}, not the state dict of a PD TrainState')
  return state


def _scalar(value):
  try:
    return int(np.asarray(value).reshape(-1)[0])
  except (TypeError, ValueError, IndexError):
    return None


def pick_params(state, key='auto'):
  """(params tree, the key it came from) of a PD state dict: ema_params, else optimizer/target, else a bare tree."""
  if key not in PARAMS_KEYS:
    _fail(f'--params_key must be one of {PARAMS_KEYS}, got {key!r}')
  candidates = {'ema_params': state.get('ema_params'),
                'optimizer.target': (state.get('optimizer') or {}).get('target')
                if isinstance(state.get('optimizer'), dict) else None,
                'none': state if 'conv_in' in state else None}
  order = ('ema_params', 'optimizer.target', 'none') if key == 'auto' else (key,)
  for name in order:
    tree = candidates[name]
    if isinstance(tree, dict) and tree:
      if name != 'ema_params':
        what = ('the raw (not averaged) weights optimizer/target' if name == 'optimizer.target'
                else 'the file itself as a bare parameter tree')
        print(f'import_pd: the checkpoint has no ema_params; importing {what}', file=sys.stderr)
      return tree, name
  wanted = ' or '.join(order)
  _fail(f'the checkpoint has no {wanted} parameter tree (its top-level keys: {sorted(state)}); a PD checkpoint '
        f'holds ema_params and optimizer/target')


# Reading the architecture from the tree.


def _leaf(tree, *path, root='ema_params'):
  node = tree
  for i, part in enumerate(path):
    if not isinstance(node, dict) or part not in node:
      _fail(f'missing parameter {"/".join((root,) + path[:i + 1])}: not the tree of PD\'s unet.UNet')
    node = node[part]
  if isinstance(node, dict):
    _fail(f'{"/".join((root,) + path)} is a module, expected a parameter array')
  return np.asarray(node)


def _check_module_names(tree, root):
  for name in tree:
    if not isinstance(tree[name], dict):
      _fail(f'unexpected parameter {root}/{name}: PD\'s unet.UNet has only modules at the top level')
    if not any(p.match(name) for p in _MODULE_PATTERNS):
      _fail(f'unexpected module {root}/{name}: not a module of PD\'s unet.UNet (conv_in, dense0, dense1, class_emb, '
            f'down_<l>.block_<i>, down_<l>.attn_<i>, down_<l>.downsample, mid.*, up_<l>.*, norm_out, conv_out)')


def _levels(tree, prefix, root):
  levels = sorted({int(m.group(1)) for name in tree for m in [re.match(rf'^{prefix}_(\d+)\.', name)] if m})
  if levels and levels != list(range(len(levels))):
    missing = min(set(range(max(levels) + 1)) - set(levels))
    _fail(f'missing module {root}/{prefix}_{missing}.block_0: the {prefix} levels found are {levels}')
  return len(levels)


def attention_blocks(tree, root='ema_params'):
  """[(PD module name, channels C, heads or None when the kernels are stored flattened)] of every attention block."""
  blocks = []
  for name in sorted(tree):
    if re.match(r'^(down_\d+\.attn_\d+|mid\.attn_1|up_\d+\.attn_\d+)$', name):
      kernel = _leaf(tree, name, 'q', 'kernel', root=root)
      if kernel.ndim == 3:
        blocks.append((name, kernel.shape[0], kernel.shape[1]))
      elif kernel.ndim == 2:
        blocks.append((name, kernel.shape[0], None))
      else:
        _fail(f'{root}/{name}/q/kernel has shape {kernel.shape}; expected (C, heads, head_dim) or (C, C)')
  return blocks


def _fits(setting, value, channels, heads):
  """Whether num_heads=value (setting 'num_heads') or head_dim=value gives `heads` heads over `channels`."""
  if not value or value < 1 or channels % value:
    return False
  got = value if setting == 'num_heads' else channels // value
  return heads is None or got == heads


def choose_heads(blocks, *, num_heads=None, head_dim=None, preset=None, root='ema_params'):
  """(num_heads, head_dim), exactly one set, that gives every attention block its heads in the tree."""
  def check(setting, value, source):
    for name, channels, heads in blocks:
      if not _fits(setting, value, channels, heads):
        _fail(f'{root}/{name}/q/kernel: {channels} channels in {heads if heads else "?"} heads do not fit '
              f'{setting}={value} ({source})')
    return (value, None) if setting == 'num_heads' else (None, value)

  if num_heads and head_dim:
    _fail('give at most one of --num_heads and --head_dim')
  if num_heads:
    return check('num_heads', num_heads, '--num_heads')
  if head_dim:
    return check('head_dim', head_dim, '--head_dim')
  preset = preset or {}
  preset_setting = [(k, preset.get(k)) for k in ('num_heads', 'head_dim') if preset.get(k)]
  if any(heads is None for _, _, heads in blocks):
    if not preset_setting:
      name = next(n for n, _, h in blocks if h is None)
      _fail(f'{root}/{name}/q/kernel is stored flattened (an older Flax layout), so the heads cannot be read from '
            f'it: pass --num_heads or --head_dim (PD config model.args), or --preset')
    return check(*preset_setting[0], 'the preset')
  if preset_setting and all(_fits(*preset_setting[0], c, h) for _, c, h in blocks):
    return (preset_setting[0][1], None) if preset_setting[0][0] == 'num_heads' else (None, preset_setting[0][1])
  if len({h for _, _, h in blocks}) == 1:
    return blocks[0][2], None
  if len({c // h for _, c, h in blocks}) == 1 and all(c % h == 0 for _, c, h in blocks):
    return None, blocks[0][1] // blocks[0][2]
  _fail(f'the attention blocks have neither one head count nor one head width ({[(n, c, h) for n, c, h in blocks]}); '
        f'our U-Net sets one of num_heads and head_dim for all blocks')


def infer_model_config(tree, *, image_size=None, output_type=None, num_heads=None, head_dim=None, preset=None,
                       root='ema_params'):
  """Our `model` config (the keys of config.base_config().model) for a PD parameter tree.

  What the tree says is read from it; image_size and output_type (and the heads, for flattened attention kernels)
  come from the arguments, else from `preset` (a model dict such as config.CIFAR10_UNET). Raises CheckpointError.
  """
  preset = dict(preset or {})
  _check_module_names(tree, root)
  conv_in = _leaf(tree, 'conv_in', 'kernel', root=root)
  if conv_in.ndim != 4 or conv_in.shape[:2] != (3, 3):
    _fail(f'{root}/conv_in/kernel has shape {conv_in.shape}; expected (3, 3, channels, ch)')
  channels, ch = conv_in.shape[2], conv_in.shape[3]
  dense0 = _leaf(tree, 'dense0', 'kernel', root=root)
  if dense0.ndim != 2 or dense0.shape[0] != ch:
    _fail(f'{root}/dense0/kernel has shape {dense0.shape}; expected ({ch}, emb_ch): the noise-level embedding has '
          f'ch={ch} features')
  emb_ch = dense0.shape[1]

  num_levels = _levels(tree, 'down', root)
  if num_levels == 0:
    _fail(f'missing module {root}/down_0.block_0: not the tree of PD\'s unet.UNet')
  num_res_blocks = len([n for n in tree if re.match(r'^down_0\.block_\d+$', n)])
  ch_mult = []
  for level in range(num_levels):
    width = _leaf(tree, f'down_{level}.block_0', 'conv1', 'kernel', root=root).shape[-1]
    if width % ch:
      _fail(f'{root}/down_{level}.block_0/conv1/kernel has {width} output channels, not a multiple of ch={ch}')
    ch_mult.append(width // ch)
  if num_levels > 1:
    down = tree.get('down_0.downsample')
    if not isinstance(down, dict):
      _fail(f'missing module {root}/down_0.downsample')
    resblock_resample = 'conv1' in down
  else:
    resblock_resample = bool(preset.get('resblock_resample', False))
  attending = sorted({int(m.group(2)) for n in tree for m in [re.match(r'^(down|up)_(\d+)\.attn_\d+$', n)] if m})

  class_emb = tree.get('class_emb')
  num_classes = _leaf(tree, 'class_emb', 'kernel', root=root).shape[0] if class_emb is not None else 0
  out_channels = _leaf(tree, 'conv_out', 'kernel', root=root).shape[-1]

  if out_channels == 2 * channels:
    if output_type not in (None, 'both'):
      _fail(f'{root}/conv_out/kernel has {out_channels} = 2 x {channels} output channels: PD\'s mean_type both, or '
            f'a learned variance, which our U-Net does not have; --output_type={output_type} does not fit')
    output_type = 'both'
  elif out_channels == channels:
    output_type = output_type or preset.get('output_type')
    if output_type == 'both':
      _fail(f'{root}/conv_out/kernel has {out_channels} output channels: output_type both needs 2 x {channels}')
    if output_type is None:
      _fail('the output type is not in the tree: pass --output_type=x|eps|v (PD config model.mean_type) or --preset')
  else:
    _fail(f'{root}/conv_out/kernel has {out_channels} output channels for {channels} input channels; expected '
          f'{channels} (mean_type x, eps or v) or {2 * channels} (both)')
  if output_type not in OUTPUT_TYPES:
    _fail(f'--output_type must be one of {OUTPUT_TYPES}, got {output_type!r}')

  image_size = image_size or preset.get('image_size')
  if not image_size:
    _fail('the image size is not in the tree: pass --image_size (32 for CIFAR-10, 64 for ImageNet 64) or --preset')
  factor = 2**(num_levels - 1)
  if image_size % factor:
    _fail(f'--image_size={image_size} is not divisible by 2**{num_levels - 1}: the tree has {num_levels} levels')
  heads = choose_heads(attention_blocks(tree, root), num_heads=num_heads, head_dim=head_dim, preset=preset, root=root)
  return dict(image_size=image_size, channels=channels, ch=ch, emb_ch=emb_ch, ch_mult=tuple(ch_mult),
              num_res_blocks=num_res_blocks, attn_resolutions=tuple(sorted(image_size // 2**l for l in attending)),
              num_heads=heads[0], head_dim=heads[1], dropout=float(preset.get('dropout', 0.0)),
              resblock_resample=resblock_resample, num_classes=num_classes, output_type=output_type,
              dtype='float32')


# The mapping.


def pd_module_name(ours, image_size):
  """PD's top-level module name of one of ours ('encoder/enc32_0' -> 'down_0.block_0'); None for class_emb."""
  half, name = ours
  fixed = {'dense0': 'dense0', 'dense1': 'dense1', 'conv_in': 'conv_in', 'class_emb': 'class_emb',
           'mid_0': 'mid.block_1', 'mid_attn': 'mid.attn_1', 'mid_1': 'mid.block_2', 'norm_out': 'norm_out',
           'conv_out': 'conv_out'}
  if name in fixed:
    return fixed[name]
  m = re.match(r'^(enc|dec)(\d+)_(\d+|down|up)(_attn)?$', name)
  if not m:
    raise ValueError(f'{half}/{name}: not a module of our U-Net')
  kind, res, index, attn = m.groups()
  level = int(round(np.log2(image_size // int(res))))
  side = 'down' if kind == 'enc' else 'up'
  if index in ('down', 'up'):
    return f'{side}_{level}.{"downsample" if index == "down" else "upsample"}'
  return f'{side}_{level}.{"attn" if attn else "block"}_{index}'


def _flatten(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def convert_params(tree, model_config, *, root='ema_params'):
  """Our U-Net's params (nested dicts of float32 numpy arrays) from PD's tree, for `model_config`.

  Every parameter of ours must come from one of PD's with the same shape (or its flattened attention layout), and
  every one of PD's must be used. Raises CheckpointError naming the first path that does not fit.
  """
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from sferd_jax.models import layers, unet  # pylint: disable=g-import-not-at-top
  try:
    model = unet.make_unet(model_config)
  except ValueError as e:
    _fail(f'the architecture read from the checkpoint ({model_config}) cannot build our U-Net: {e}')
  expected = _flatten(flax.core.unfreeze(jax.eval_shape(
      lambda: unet.init_params(model, jax.random.key(0), model_config=model_config))))
  pd = _flatten(tree)
  used = set()
  out = {}
  shown = lambda path: '/'.join((root,) + path)

  def take(path):
    if path not in pd:
      near = [shown(p) for p in pd if p[0] == path[0] and p not in used and p != path]
      _fail(f'missing parameter {shown(path)}' + (f' (its module has instead: {", ".join(near[:4])})' if near else ''))
    used.add(path)
    value = np.asarray(pd[path])
    if not np.issubdtype(value.dtype, np.floating):
      _fail(f'{shown(path)} has dtype {value.dtype}; parameters are floating point')
    return value.astype(np.float32)

  for path, like in expected.items():
    half, module, *inner = path
    pd_module = pd_module_name((half, module), model_config['image_size'])
    if module == 'class_emb':
      kernel, bias = take((pd_module, 'kernel')), take((pd_module, 'bias'))
      want = like.shape
      if kernel.shape != want:
        _fail(f'{shown((pd_module, "kernel"))} has shape {kernel.shape}; expected {want} (num_classes, emb_ch)')
      if bias.shape != want[1:]:
        _fail(f'{shown((pd_module, "bias"))} has shape {bias.shape}; expected {want[1:]}')
      out[path] = kernel + bias[None, :]  # Dense(one_hot(y)) = kernel[y] + bias
      continue
    pd_path = (pd_module, *inner)
    value = take(pd_path)
    if value.shape != like.shape:
      flattened = (len(inner) == 2 and inner[0] in _ATTENTION_LEAVES and value.size == like.size
                   and value.shape == _flat_shape(inner[0], inner[1], like.shape))
      if not flattened:
        _fail(f'{shown(pd_path)} has shape {value.shape}; the architecture read from the checkpoint needs '
              f'{like.shape} there ({_describe(model_config)})')
      value = value.reshape(like.shape)  # older Flax's DenseGeneral layout, as PD's loader reshapes it
    if inner and inner[0].startswith('norm') or module.startswith('norm'):
      groups = layers.num_groups(value.shape[-1])
      if groups != 32:
        _fail(f'{shown(pd_path)}: a GroupNorm over {value.shape[-1]} channels; PD normalises in 32 groups, our U-Net '
              f'in min(32, C // 4) = {groups}, so the import would not be exact (every GroupNorm needs C >= 128)')
    out[path] = value
  unused = [p for p in pd if p not in used]
  if unused:
    _fail(f'unexpected parameter {shown(unused[0])}: the architecture read from the checkpoint '
          f'({_describe(model_config)}) has no place for it' + (f' ({len(unused) - 1} more)' if len(unused) > 1
                                                                 else ''))
  return _unflatten(out)


def _flat_shape(leaf, kind, shape):
  """The flattened (older Flax) shape of an attention DenseGeneral parameter of full shape `shape`."""
  if leaf == 'proj_out':
    return (shape[0] * shape[1], shape[2]) if kind == 'kernel' else shape
  return (shape[0], shape[1] * shape[2]) if kind == 'kernel' else (shape[0] * shape[1],)


def _describe(model_config):
  keys = ('image_size', 'ch', 'emb_ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'num_heads', 'head_dim',
          'resblock_resample', 'num_classes', 'output_type')
  return ', '.join(f'{k}={model_config[k]}' for k in keys)


# The import.


def import_checkpoint(checkpoint, export_path, *, preset=None, image_size=None, output_type=None, num_heads=None,
                      head_dim=None, num_steps=None, name=None, data_name=None, params_key='auto'):
  """Converts a PD checkpoint into an export at `export_path`; returns its model.json info."""
  from sferd_jax import exports, layout  # pylint: disable=g-import-not-at-top
  from sferd_jax.training import phases  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if preset is not None and preset not in PRESETS:
    _fail(f'--preset must be one of {sorted(PRESETS)}, got {preset!r}')
  export_path = files.absolute(export_path)
  if layout.is_exported(export_path):
    _fail(f'{export_path} already holds an exported model; it is never overwritten. Choose another folder.')
  settings = PRESETS.get(preset, {})
  preset_model = dict(settings.get('model', {}))
  file, file_step = find_checkpoint(checkpoint)
  state = read_checkpoint(file)
  tree, key = pick_params(state, params_key)
  root = 'ema_params' if key == 'ema_params' else ('optimizer/target' if key == 'optimizer.target' else '')
  root = root or '<file>'

  model = infer_model_config(tree, image_size=image_size, output_type=output_type, num_heads=num_heads,
                             head_dim=head_dim, preset=preset_model, root=root)
  if preset:
    given = {'image_size': image_size, 'output_type': output_type, 'num_heads': num_heads, 'head_dim': head_dim}
    skip = {k for k, v in given.items() if v} | ({'num_heads', 'head_dim'} if num_heads or head_dim else set())
    diff = {k: (model[k], _plain(preset_model[k])) for k in preset_model
            if k not in skip and k not in ('dropout', 'dtype') and _plain(model[k]) != _plain(preset_model[k])}
    if diff:
      _fail(f'{file} does not have the {preset} preset\'s architecture (key: (checkpoint, preset)): {diff}. Use the '
            f'right --preset, or leave it out and give --image_size, --output_type and --num_steps.')
  params = convert_params(tree, model, root=root)

  ckpt_steps = _scalar(state.get('num_sample_steps')) if key != 'none' else None
  num_steps = num_steps or (ckpt_steps if ckpt_steps and ckpt_steps > 0 else None) or settings.get('num_steps')
  if not num_steps or num_steps < 1:
    _fail('the checkpoint does not say how many steps it samples with (num_sample_steps is 0 for a base model): '
          'pass --num_steps (PD\'s teachers: 8192 for CIFAR-10, 1024 for ImageNet 64) or --preset')
  step = _scalar(state.get('step')) if key != 'none' else None
  if step is None:
    step = file_step

  config = config_lib.base_config()
  with config.unlocked():
    config.model.update(model)
    config.diffusion.update(logsnr_min=-20.0, logsnr_max=20.0)
  name = name or f'pd_{preset or os.path.basename(file.rstrip("/"))}'
  imported_from = dict(checkpoint=file, step=step, params=key.replace('.', '/'), num_sample_steps=ckpt_steps,
                       source='progressive distillation (google-research diffusion_distillation), flax msgpack')
  info = phases.model_info(config, name=name, phase='teacher', num_steps=int(num_steps),
                           imported_from=imported_from)
  data_name = data_name or settings.get('data_name')
  info['data'] = dict(imported=f'trained by progressive distillation; imported from {file}',
                      image_size=model['image_size'], channels=model['channels'],
                      **({'name': data_name} if data_name else {}))
  trees = {'params': jax.tree.map(jnp.asarray, params)}
  exports.export_model(export_path, trees=trees, info=info)
  return info


def _plain(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m sferd_jax.tools.import_pd',
      description='Import a progressive-distillation checkpoint (flax msgpack) as an exported sferd_jax model.')
  parser.add_argument('checkpoint', help='a PD checkpoint file (e.g. cifar_original, fetched from '
                      f'{BUCKET}), or a folder of checkpoint_<step> files (the highest step is taken)')
  parser.add_argument('export', help='the export folder to write (must not hold an export already)')
  parser.add_argument('--preset', choices=sorted(PRESETS), help="PD's published settings: image_size, output_type, "
                      'heads, num_steps and data name (cifar10: 32, x, 1 head, 8192; imagenet64: 64, both, '
                      'head_dim 64, 1024); the architecture in the checkpoint is checked against it')
  parser.add_argument('--image_size', type=int, help='image side the model was trained at (not in the tree)')
  parser.add_argument('--output_type', choices=OUTPUT_TYPES, help="PD's model.mean_type (not in the tree unless 2C "
                      "output channels, which mean 'both')")
  parser.add_argument('--num_heads', type=int, help='attention heads (needed only for flattened attention kernels)')
  parser.add_argument('--head_dim', type=int, help='attention head width (alternative to --num_heads)')
  parser.add_argument('--num_steps', type=int, help="sampling steps the model is used with (default: the "
                      "checkpoint's num_sample_steps when > 0, else the preset's)")
  parser.add_argument('--name', help='the model name in model.json (default pd_<preset or file name>)')
  parser.add_argument('--data_name', help='the data.name the model was trained on, checked when a run distils it '
                      '(default: the preset\'s)')
  parser.add_argument('--params_key', default='auto', choices=PARAMS_KEYS,
                      help='which parameters: auto = ema_params, else optimizer/target, else a bare tree')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    info = import_checkpoint(args.checkpoint, args.export, preset=args.preset, image_size=args.image_size,
                             output_type=args.output_type, num_heads=args.num_heads, head_dim=args.head_dim,
                             num_steps=args.num_steps, name=args.name, data_name=args.data_name,
                             params_key=args.params_key)
  except errors.USER_ERRORS as e:  # the user's to fix: one line on stderr, no traceback (as sferd_jax.main)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(errors.USER_ERROR_EXIT_CODE)
  source = info['imported_from']
  export = files.absolute(args.export)
  print(f'imported {source["checkpoint"]} (step {source["step"]}, {source["params"]}) into {export}: '
        f'{_describe(info["model"])}; samples with {info["num_steps"]} steps. Distil it with '
        f'--config.distill.teacher={export}')


if __name__ == '__main__':
  main()
