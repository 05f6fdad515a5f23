"""No module imports one above it: the package's layers, read from the source so it stays true.

  main  tools/                  the CLI  |  one-off converters (import_pd)
  study                         the ablation runner
  pipeline                      a run: the phases of config.phases in order
  training/  evaluation/        the loop and the phases  |  FID, the classifier, the fitting-error analysis
  exports                       load() -> Model, export_model
  sampling                      sample()
  config                        the schema and validate()
  sferd/                        the paper's two mechanisms: the guided teacher, the semantic predictor
  models/                       architectures
  diffusion/  data/  sharding   the maths  |  sources and batches  |  meshes and jit
  images layout progress        grids | run-folder paths | ETAs
  files                         every file read and written, local or in a bucket; the lock
  errors                        the user's errors: every layer may raise them
"""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'sferd_jax')

# Bottom to top. A module may import its own unit (module or subpackage) and any unit of a lower layer, never one
# beside it: training and evaluation know nothing of each other.
LAYERS = (
    ('errors',),
    ('files',),
    ('images', 'layout', 'progress'),
    ('diffusion', 'data', 'sharding'),
    ('models',),
    ('sferd',),
    ('config',),
    ('sampling',),
    ('exports',),
    ('training', 'evaluation'),
    ('pipeline',),
    ('study',),
    ('main', 'tools', '__init__'),
)
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _unit(module):
  """'sferd_jax.training.loop' -> 'training'; 'sferd_jax.config' -> 'config'."""
  return module.split('.')[1]


def _imports(path):
  """The sferd_jax modules a file imports, at any depth (function-level imports included)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level:  # relative: not checked below, so not allowed
      found.append(f"{'.' * node.level}{node.module or ''} (relative)")
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('sferd_jax'):
      found += [node.module if node.module != 'sferd_jax' else f'sferd_jax.{alias.name}' for alias in node.names]
    elif isinstance(node, ast.Import):
      found += [alias.name for alias in node.names if alias.name.startswith('sferd_jax')]
  return found


def _package_files():
  """{unit: [files]} of every module of the package."""
  out = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, PACKAGE)
        out.setdefault(rel.split(os.sep)[0].removesuffix('.py'), []).append(path)
  return out


def test_every_unit_has_a_layer():
  assert set(_package_files()) == set(LAYER_OF), 'add a new module or subpackage to LAYERS'


def test_no_module_imports_one_above_or_beside_it():
  bad = []
  for unit, paths in _package_files().items():
    for path in paths:
      for module in _imports(path):
        if module.endswith('(relative)'):
          bad.append(f'{path}: {module}')
          continue
        other = _unit(module)
        if other != unit and LAYER_OF[other] >= LAYER_OF[unit]:
          bad.append(f'{os.path.relpath(path, PACKAGE)} ({unit}, layer {LAYER_OF[unit]}) imports {module} '
                     f'({other}, layer {LAYER_OF[other]})')
  assert not bad, '\n'.join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
  """The reader sees function-level imports and `from sferd_jax import x` forms (so the test above can fail)."""
  path = tmp_path / 'probe.py'
  path.write_text('def f():\n  from sferd_jax import pipeline\n  from sferd_jax.training import loop\n'
                  '  import sferd_jax.exports\n')
  assert _imports(str(path)) == ['sferd_jax.pipeline', 'sferd_jax.training', 'sferd_jax.exports']


def test_a_config_file_loads_without_jax():
  """Config files import sferd_jax.config; validate() imports the maths it checks only when called."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(PACKAGE)
  code = ('import importlib.util, sys; '
          f'spec = importlib.util.spec_from_file_location("c", {os.path.join(root, "configs", "quickstart.py")!r}); '
          'module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module.get_config(); '
          'assert "jax" not in sys.modules, "loading a config imported jax"')
  out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
