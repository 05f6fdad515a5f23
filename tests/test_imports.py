"""The package's lower layers do not import its upper ones (read from the source, so it stays true)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'sferd_jax')


def _imports(subpackage):
  """{module file: [sferd_jax modules it imports, at any depth (function-level imports included)]}."""
  out = {}
  folder = os.path.join(PACKAGE, subpackage)
  for name in sorted(os.listdir(folder)):
    if not name.endswith('.py'):
      continue
    with open(os.path.join(folder, name), encoding='utf-8') as f:
      tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.level:  # relative: not checked below, so not allowed
        found.append(f"{'.' * node.level}{node.module or ''} (relative)")
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('sferd_jax'):
        found += [f'{node.module}.{alias.name}' for alias in node.names]
      elif isinstance(node, ast.Import):
        found += [alias.name for alias in node.names if alias.name.startswith('sferd_jax')]
    out[f'{subpackage}/{name}'] = found
  return out


def test_models_and_diffusion_never_import_sferd_or_training():
  """The paper's mechanisms live in sferd/ alone: architectures (models/) and maths (diffusion/) know nothing of
  them, nor of the training code."""
  for subpackage, allowed in (('diffusion', ('sferd_jax.diffusion.',)),
                              ('models', ('sferd_jax.diffusion.', 'sferd_jax.models.'))):
    imports = _imports(subpackage)
    assert imports, subpackage
    bad = {path: [m for m in modules if not m.startswith(allowed)] for path, modules in imports.items()}
    assert not any(bad.values()), bad


def test_sferd_imports_only_maths_and_models():
  imports = _imports('sferd')
  allowed = ('sferd_jax.diffusion.', 'sferd_jax.models.', 'sferd_jax.sferd.')
  bad = {path: [m for m in modules if not m.startswith(allowed)] for path, modules in imports.items()}
  assert not any(bad.values()), bad
