"""The notebooks: valid nbformat 4 without outputs, in step with notebooks/make_notebooks.py, and every code cell
run in order, in-process, on the tiny config (no Jupyter): shell (!) and magic (%) lines are skipped, the rest is
exec'd in one namespace. The notebook reuses the session's finished tiny run (SFERD_NOTEBOOK_WORKDIR), so its
training cell only checks that every phase is done."""

import importlib.util
import json
import os
import re
import warnings

import matplotlib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')
QUICKSTART = os.path.join(NOTEBOOKS, 'sferd_quickstart.ipynb')


def _generator():
  spec = importlib.util.spec_from_file_location('make_notebooks', os.path.join(NOTEBOOKS, 'make_notebooks.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _code(cell):
  """A cell's Python: lines that IPython would run as shell commands or magics are dropped."""
  lines = ''.join(cell['source']).split('\n')
  return '\n'.join(line for line in lines if not line.lstrip().startswith(('!', '%')))


def run_notebook(path):
  """Executes every code cell of `path` in order in one namespace; returns (namespace, cells run)."""
  namespace = {'__name__': '__main__'}
  code_cells = [c for c in _load(path)['cells'] if c['cell_type'] == 'code']
  for i, cell in enumerate(code_cells):
    name = f'<{os.path.basename(path)} cell {i} ({cell.get("id")})>'
    exec(compile(_code(cell), name, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace, len(code_cells)


def test_notebook_is_valid_nbformat4_without_outputs():
  notebook = _load(QUICKSTART)
  assert notebook['nbformat'] == 4 and notebook['nbformat_minor'] >= 5
  assert notebook['metadata']['kernelspec']['name'] == 'python3'
  ids = [c['id'] for c in notebook['cells']]
  assert len(set(ids)) == len(ids)
  for cell in notebook['cells']:
    assert cell['cell_type'] in ('markdown', 'code') and isinstance(cell['source'], list)
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None
      compile(_code(cell), cell['id'], 'exec')
  try:
    import nbformat  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))


def test_notebook_matches_its_generator():
  generator = _generator()
  with open(QUICKSTART, encoding='utf-8') as f:
    assert f.read() == generator.render(generator.quickstart()), (
        'notebooks/sferd_quickstart.ipynb is stale: run python notebooks/make_notebooks.py')


def test_notebook_code_has_no_placeholders_or_retired_setup():
  code = '\n'.join(''.join(c['source']) for c in _load(QUICKSTART)['cells'] if c['cell_type'] == 'code')
  for bad in ('/todo/', 'svn ', 'gsutil', 'os.system', 'setup_tpu', 'tpu_driver', 'git clone', 'git+http'):
    assert bad not in code, bad
  assert not re.search(r'<[A-Za-z][A-Za-z _-]*>', code), 'a <placeholder> in a code cell'


def test_quickstart_notebook_runs_on_the_tiny_config(tiny_run, monkeypatch):
  workdir, _ = tiny_run
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('SFERD_NOTEBOOK_CONFIG', 'configs/tiny.py')
  monkeypatch.setenv('SFERD_NOTEBOOK_WORKDIR', workdir)
  monkeypatch.chdir(ROOT)
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='.*non-interactive.*')  # plt.show() under Agg
    namespace, num_cells = run_notebook(QUICKSTART)
  try:
    assert num_cells >= 8
    assert namespace['WORKDIR'] == workdir and namespace['config'].model.image_size == 8
    # The tiny run: a 4-step teacher, students of 2 and 1 steps, a semantic predictor on the last.
    assert namespace['teacher'].config.num_steps == 4
    assert [s.config.num_steps for s in namespace['students']] == [2, 1]
    assert [s.config.num_steps for s in namespace['shown']] == [2, 1]
    assert namespace['last'].has_semantic
    figures = namespace['FIGURES']
    assert sorted(figures) == ['attention', 'guidance', 'semantic', 'teacher_vs_students']
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures.values())
    # One grid per row: the teacher, each student shown, the teacher at 1 step.
    assert len(figures['teacher_vs_students'].axes) == 4
    assert namespace['teacher_images'].shape == (8, 8, 8, 1) and namespace['teacher_images'].dtype == np.uint8
    assert namespace['guided_images'].shape == (8, 8, 8, 1)
    probs = namespace['probs']
    assert probs.shape == (8, 2, 16, 16)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    mask = namespace['mask']
    assert mask.shape == (8, 8, 8, 1) and set(np.unique(mask)) <= {0.0, 1.0}
  finally:
    plt.close('all')
