r"""Writes notebooks/sferd_quickstart.ipynb (nbformat 4.5) from the cells below.

  python notebooks/make_notebooks.py             # the cells; a cell whose code is unchanged keeps its outputs
  python notebooks/make_notebooks.py --execute   # then runs it top to bottom in a Jupyter kernel and saves the
                                                 # outputs (the real quickstart; needs `pip install nbclient ipykernel`)

Edit the cells here, not the .ipynb: tests/test_notebooks.py checks the two agree (outputs aside) and runs every code
cell on the tiny config. Code cells must run top to bottom in one namespace, on a CPU, on any config in configs/.
"""

import datetime
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QUICKSTART = os.path.join(HERE, 'sferd_quickstart.ipynb')

INTRO = r"""# SFERD quickstart: distil a diffusion model to a few steps, in JAX

**SFERD** ("Reducing Spatial Fitting Error in Distillation of Denoising Diffusion Models", Zhou et al., AAAI 2024,
[arXiv 2311.03830](https://arxiv.org/abs/2311.03830)) is progressive distillation with two additions:

1. **an attention-guided teacher**: where the teacher's self-attention concentrates ("risky" regions, where its
   fitting error is largest), the image is blurred, re-noised and denoised again, and the teacher's prediction is
   pushed away from that degraded one. The student learns from this guided teacher.
2. **a semantic gradient predictor**: a small network, trained on the frozen student, that shifts the student's
   prediction using a semantic code; at sampling time the code comes from a small latent diffusion model.

This notebook runs the whole pipeline of `sferd_jax` on the embedded digits dataset (no download), through the
Python API: train a teacher, distil it stage by stage (each stage halves the number of sampling steps), train the
semantic predictor of the last stages, distil the same teacher into a consistency model (consistency distillation
with the guided teacher), then compare the teacher with its few-step students, sample the teacher with attention
guidance, switch the semantic predictor on and off, and look at one attention map and its risky mask. The outputs
saved with this notebook are those of one run on a 2-core CPU (its metadata says when and how long it took).

**Runtime, honestly.** The training cell runs `configs/quickstart.py`; its header says how long it takes on a
2-core CPU, and a Colab CPU runtime is of that order. A GPU or TPU runtime is faster, mostly compilation. The
samples of a quickstart-sized model are rough digits, not benchmark quality: the real configs are
`configs/cifar10_*.py` and `configs/imagenet64_*.py`, run from the command line (see `launch/`). Re-running the
training cell resumes where it stopped and skips finished phases, so a disconnected runtime loses little (unless
the workdir itself was lost: point `WORKDIR` at a mounted Drive folder to keep it). This notebook is executed by
the repository's tests on a tiny config on a CPU; it has not been run on Colab's own GPU or TPU runtimes by us.
"""

SETUP_MD = r"""## Set-up

This notebook needs the `sferd_jax` package. In a local checkout where it is installed (`pip install -e .`), the
next cell just checks that. On Colab, set `REPO` below once, to the repository's git URL (the cell clones it) or to
a folder holding it (uploaded and unzipped, or on your Drive), and run the cell: it installs the package from there
with `%pip install -e`. If pip upgraded JAX, restart the session (Runtime > Restart session) and run the notebook
again from the top. The cell after it says which accelerator JAX found.

On a Colab TPU runtime JAX finds the TPU by itself: no driver set-up cell is needed (the old
`jax.tools.colab_tpu.setup_tpu()` was for a retired runtime and must not be called).
"""

SETUP = r"""import importlib.util
import os
import subprocess
import sys

REPO = ''  # the repository's git URL (cloned to /content/sferd_jax), or the folder holding pyproject.toml
REPO_DIR = '/content/sferd_jax' if '://' in REPO or REPO.startswith('git@') else REPO

if importlib.util.find_spec('sferd_jax') is None:
  if REPO_DIR != REPO and not os.path.exists(REPO_DIR):
    subprocess.run(['git', 'clone', '-q', '--depth', '1', REPO, REPO_DIR], check=True)
  if not REPO_DIR or not os.path.exists(os.path.join(REPO_DIR, 'pyproject.toml')):
    raise RuntimeError('sferd_jax is not installed. Set REPO above to the repository\'s git URL or to its folder '
                       '(the one holding pyproject.toml) and run this cell again.')
  %pip install -q -e {REPO_DIR}
  sys.path.insert(0, REPO_DIR)  # an editable install is only seen by new processes; this one imports from here

import sferd_jax
PACKAGE_DIR = os.path.abspath(list(sferd_jax.__path__)[0])
ROOT = REPO_DIR or os.path.dirname(PACKAGE_DIR)  # configs/ sits beside the package in a checkout
print('sferd_jax from', PACKAGE_DIR)
"""

IMPORTS = r"""import importlib.util
import logging as std_logging
import time

from absl import logging
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import sferd_jax
from sferd_jax import config as config_lib
from sferd_jax import images as images_lib
from sferd_jax import layout
from sferd_jax import pipeline
from sferd_jax import sampling
from sferd_jax.diffusion import process
from sferd_jax.models import unet
from sferd_jax.sferd import guided_teacher

logging.set_verbosity(logging.INFO)  # one progress line per logged step; Orbax's per-save lines are dropped
std_logging.getLogger('absl').addFilter(lambda r: r.levelno >= std_logging.WARNING or '/orbax/' not in r.pathname)
print('JAX', jax.__version__, 'devices:', jax.devices())
ACCELERATOR = jax.default_backend()  # 'gpu', 'tpu' or 'cpu'
print({'gpu': 'A GPU: the training cell takes a few minutes, mostly compilation.',
       'tpu': 'A TPU: the training cell takes a few minutes, mostly compilation.'}.get(
           ACCELERATOR, 'No accelerator (CPU): the training cell takes about as long as configs/quickstart.py says '
           '(Runtime > Change runtime type for a GPU or TPU).'))
"""

CONFIG_MD = r"""## The config and the run folder

A config is a Python file in `configs/` whose `get_config()` returns an `ml_collections.ConfigDict`; it is loaded
here straight from its path. `WORKDIR` is the run folder: checkpoints, exported models, sample grids, metrics.
"""

CONFIG = r"""CONFIG = os.environ.get('SFERD_NOTEBOOK_CONFIG', 'configs/quickstart.py')
WORKDIR = os.environ.get('SFERD_NOTEBOOK_WORKDIR', 'runs/notebook_quickstart')


def load_config(path):
  spec = importlib.util.spec_from_file_location('notebook_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


config = load_config(CONFIG if os.path.exists(CONFIG) else os.path.join(ROOT, CONFIG))
config_lib.validate(config)
print('phases:', config.phases, '| teacher steps:', config.distill.start_num_steps, '->',
      config.distill.end_num_steps, 'in', config_lib.num_stages(config), 'halvings | workdir:', WORKDIR)
"""

TRAIN_MD = r"""## Train: teacher, distillation stages, semantic predictor

`run_pipeline` runs every phase in `config.phases` in order. Each phase exports its model; a finished phase is
skipped, so this cell also resumes an interrupted run. It is the same as
`python -m sferd_jax.main --config=configs/quickstart.py --workdir=runs/notebook_quickstart`.
"""

TRAIN = r"""start = time.time()
pipeline.run_pipeline(config, WORKDIR)
print(f'pipeline finished (or already done) in {time.time() - start:.0f} s')
"""

LOAD_MD = r"""## Load the teacher and the students

`sferd_jax.load` reads an exported model: its parameters and everything needed to sample it. Each distillation
stage's student samples with half the steps of its teacher.
"""

LOAD = r"""run = layout.RunLayout(WORKDIR)  # where each phase's export lives in the run folder
teacher = sferd_jax.load(run.teacher_model)
students = [sferd_jax.load(path) for _, path in run.finished_stages()]
print(f'teacher: {teacher.config.num_steps} steps')
for s in students:
  print(f'{s.config.name}: {s.config.num_steps} steps' + (', with a semantic predictor' if s.has_semantic else ''))
if not students:
  print('no distilled students: add "distill" to config.phases to distil the teacher')
# The students shown below: those of 4, 2 and 1 steps, else the last three.
shown = [s for s in students if s.config.num_steps in (4, 2, 1)] or students[-3:]
"""

COMPARE_MD = r"""## Teacher vs students, from the same noise

Every row starts from the same noise (`sample` draws sample i's noise from the key and i only). The consistency
model, when the run has one, samples with its own sampler (fresh noise at each step). The last row is the teacher
itself at one step: what distillation buys.
"""

COMPARE = r"""NUM = 8
rng = jax.random.key(0)
FIGURES = {}


def steps(n):
  return f'{n} step' + ('s' if n > 1 else '')


def show(rows, title):
  # rows: [(label, uint8 images (N, H, W, C))]; one grid per row.
  fig, axes = plt.subplots(len(rows), 1, figsize=(NUM * 0.9, 1.3 * len(rows)), squeeze=False)
  for ax, (label, images) in zip(axes[:, 0], rows):
    image = images_lib.grid(images, columns=len(images))
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=255)
    ax.set_title(label, fontsize=9, loc='left')
    ax.axis('off')
  fig.suptitle(title)
  fig.tight_layout()
  plt.show()
  return fig


teacher_images = teacher.sample(rng, num_samples=NUM)
rows = [(f'teacher, {steps(teacher.config.num_steps)}', teacher_images)]
rows += [(f'{s.config.name} student, {steps(s.config.num_steps)}', s.sample(rng, num_samples=NUM)) for s in shown]
if layout.is_exported(run.consistency_model):  # consistency distillation of the same teacher (config.phases)
  cd = sferd_jax.load(run.consistency_model)
  rows += [(f'consistency model, {steps(n)}', cd.sample(rng, num_samples=NUM, num_steps=n)) for n in (2, 1)]
rows.append(('teacher, 1 step', teacher.sample(rng, num_samples=NUM, num_steps=1)))
FIGURES['teacher_vs_students'] = show(rows, 'same noise, fewer steps')
"""

GUIDANCE_MD = r"""## The attention-guided teacher

The guided teacher is what SFERD distils from when `config.sferd.attention_guidance.enabled` is on. The same
settings sample the teacher with guidance (`guidance=...`): `weight` sets how far the prediction moves away from
the blurred one, `block` which attention block's map decides what is risky.
"""

GUIDANCE = r"""guidance = dict(config.sferd.attention_guidance, enabled=True)
guided_images = teacher.sample(rng, num_samples=NUM, guidance=guidance)
FIGURES['guidance'] = show([('teacher', teacher_images), (f"teacher, attention-guided (weight {guidance['weight']})",
                                                         guided_images)], 'attention guidance')
print('mean |guided - plain| in grey levels:',
      np.abs(guided_images.astype(np.float32) - teacher_images.astype(np.float32)).mean())
"""

SEMANTIC_MD = r"""## The semantic gradient predictor, on and off

A stage listed in `config.sferd.semantic.stages` (by default the last three: the 4-, 2- and 1-step students) gets
a predictor and a latent model that draws its semantic codes. The predictor is trained against a target that
depends on the clean image beyond the noisy input (`config.sferd.semantic.target`), so its code matters:
`sampling.code_sensitivity` measures by how much. `semantic=True` samples the student with it; off is the plain
student, exactly.
"""

SEMANTIC = r"""last = students[-1] if students else None
if last is not None and last.has_semantic:
  FIGURES['semantic'] = show([(f'{last.config.name}, plain', last.sample(rng, num_samples=NUM)),
                              (f'{last.config.name}, semantic predictor on', last.sample(rng, num_samples=NUM,
                                                                                          semantic=True))],
                             f'{last.config.num_steps}-step student with and without its predictor')
else:
  print('the last student has no semantic predictor: put "semantic" and "latent" in config.phases')
"""

ATTENTION_MD = r"""## One attention map and its risky mask

The U-Net's attention blocks record their softmax probabilities when asked (`capture_attention`) and the apply is
made with `mutable=['intermediates']`. Summing a map over its queries gives how much attention each position draws;
positions above the average (`threshold` 1.0) form the risky mask that guidance blurs. Here the teacher looks at
its own samples, noised to log-SNR 0 (half signal, half noise).
"""

ATTENTION = r"""model_config = teacher.config.model
block = guided_teacher.guidance_block(model_config, config.sferd.attention_guidance)
capturing = unet.make_unet(model_config, capture_attention=(block,))
x = jnp.asarray(teacher_images, jnp.float32) / 127.5 - 1.0
logsnr = jnp.zeros((NUM,))
z = process.diffuse(x=x, eps=jax.random.normal(jax.random.key(1), x.shape), logsnr=logsnr)
labels = jnp.zeros((NUM,), jnp.int32) if model_config.num_classes else None
_, state = capturing.apply({'params': teacher.params}, z, logsnr, labels, train=False, mutable=['intermediates'])
probs = unet.attention_probs(state)[block]  # (batch, heads, queries, keys)
side = int(np.sqrt(probs.shape[-1]))
mass = np.asarray(guided_teacher.attention_mass(probs)).reshape(NUM, side, side)  # 1.0 = the average
mask = np.asarray(guided_teacher.risky_mask(probs, image_hw=model_config.image_size,
                                                threshold=config.sferd.attention_guidance['threshold']))

fig, axes = plt.subplots(3, NUM, figsize=(NUM * 0.9, 3.0), squeeze=False)
panels = (('noisy input', np.asarray(z[..., 0]), 'gray'), (f'{block} mass', mass, 'magma'),
          ('risky mask', mask[..., 0], 'gray'))
for row, (label, images, cmap) in enumerate(panels):
  for i in range(NUM):
    axes[row, i].imshow(images[i], cmap=cmap)
    axes[row, i].axis('off')
  axes[row, 0].set_title(label, fontsize=8, loc='left')
fig.tight_layout()
plt.show()
FIGURES['attention'] = fig
print(f'{block}: {probs.shape[1]} heads over a {side}x{side} grid; risky fraction {mask.mean():.2f}')
"""

NEXT_MD = r"""## Next

- The same run from a terminal: `python -m sferd_jax.main --config=configs/quickstart.py --workdir=runs/quickstart`;
  any config key can be overridden, e.g. `--config.sferd.attention_guidance.weight=0.5`.
- Sample an exported model: `--mode=sample --config.sample.num_steps=1`, or `sferd_jax.load(workdir).sample(...)`.
- CIFAR-10 and ImageNet 64x64 configs, and launch scripts for GPU machines, SLURM clusters and TPU pods: `configs/`,
  `launch/README.md`.
"""


def cell(kind, source, cell_id):
  lines = source.strip('\n').split('\n')
  out = {'cell_type': kind, 'id': cell_id, 'metadata': {},
         'source': [line + '\n' for line in lines[:-1]] + [lines[-1]]}
  if kind == 'code':
    out.update(execution_count=None, outputs=[])
  return out


def quickstart():
  cells = [('markdown', INTRO, 'intro'), ('markdown', SETUP_MD, 'setup-md'), ('code', SETUP, 'setup'),
           ('code', IMPORTS, 'imports'), ('markdown', CONFIG_MD, 'config-md'), ('code', CONFIG, 'config'),
           ('markdown', TRAIN_MD, 'train-md'), ('code', TRAIN, 'train'), ('markdown', LOAD_MD, 'load-md'),
           ('code', LOAD, 'load'), ('markdown', COMPARE_MD, 'compare-md'), ('code', COMPARE, 'compare'),
           ('markdown', GUIDANCE_MD, 'guidance-md'), ('code', GUIDANCE, 'guidance'),
           ('markdown', SEMANTIC_MD, 'semantic-md'), ('code', SEMANTIC, 'semantic'),
           ('markdown', ATTENTION_MD, 'attention-md'), ('code', ATTENTION, 'attention'),
           ('markdown', NEXT_MD, 'next')]
  return {
      'cells': [cell(*c) for c in cells],
      'metadata': {
          'colab': {'name': 'sferd_quickstart.ipynb', 'provenance': []},
          'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
          'language_info': {'name': 'python'},
      },
      'nbformat': 4,
      'nbformat_minor': 5,
  }


def render(notebook):
  return json.dumps(notebook, indent=1, ensure_ascii=False) + '\n'


def without_outputs(notebook):
  """The notebook as the generator writes it: no outputs, no execution counts, no record of a run."""
  notebook = json.loads(json.dumps(notebook))
  notebook['metadata'].pop(EXECUTED, None)
  for c in notebook['cells']:
    if c['cell_type'] == 'code':
      c.update(execution_count=None, outputs=[])
  return notebook


EXECUTED = 'sferd_executed'  # notebook metadata: when, where and how long the saved outputs took


def with_kept_outputs(notebook, previous):
  """`notebook` with the outputs of `previous` where every code cell is unchanged (same id and code); otherwise
  none at all, so the saved outputs are always those of one run of exactly these cells."""
  old = {c['id']: c for c in previous['cells'] if c['cell_type'] == 'code'}
  new = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  if EXECUTED not in previous['metadata'] or [c['id'] for c in new] != list(old) or any(
      c['source'] != old[c['id']]['source'] for c in new):
    return notebook
  notebook = json.loads(json.dumps(notebook))
  for c in notebook['cells']:
    if c['cell_type'] == 'code':
      c.update(execution_count=old[c['id']]['execution_count'], outputs=old[c['id']]['outputs'])
  notebook['metadata'][EXECUTED] = previous['metadata'][EXECUTED]
  return notebook


def execute(notebook):
  """Runs every cell in order in a python3 Jupyter kernel started in the checkout (so the training cell trains
  runs/notebook_quickstart there) and returns the notebook with its outputs and a record of the run."""
  import jax  # pylint: disable=g-import-not-at-top
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  node = nbformat.reads(json.dumps(notebook), as_version=4)
  start = time.time()
  nbclient.NotebookClient(node, timeout=None, kernel_name='python3',
                          resources={'metadata': {'path': os.path.dirname(HERE)}}).execute()
  executed = json.loads(nbformat.writes(node))
  executed['metadata'] = dict(notebook['metadata'], **{EXECUTED: dict(
      date=datetime.date.today().isoformat(), seconds=round(time.time() - start),
      machine=f'{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} ({jax.default_backend()})')})
  for c in executed['cells']:  # nbformat adds per-cell execution timestamps; keep the file stable
    c['metadata'].pop('execution', None)
  return executed


def main():
  notebook = quickstart()
  if '--execute' in sys.argv[1:]:
    notebook = execute(notebook)
  elif os.path.exists(QUICKSTART):
    with open(QUICKSTART, encoding='utf-8') as f:
      notebook = with_kept_outputs(notebook, json.load(f))
  with open(QUICKSTART, 'w', encoding='utf-8') as f:
    f.write(render(notebook))
  print('wrote', QUICKSTART, file=sys.stderr)


if __name__ == '__main__':
  main()
