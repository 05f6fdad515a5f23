"""The notebooks: valid nbformat 4, in step with notebooks/make_notebooks.py (outputs aside), any saved outputs those
of one top-to-bottom run, and every code cell run in order, in-process, on the tiny config (no Jupyter): shell (!)
and magic (%) lines are skipped, the rest is exec'd in one namespace. The notebook reuses the session's finished
tiny run (SFERD_NOTEBOOK_WORKDIR), so its training cell only checks that every phase is done."""

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


def test_notebook_is_valid_nbformat4_and_its_outputs_are_one_run():
  notebook = _load(QUICKSTART)
  assert notebook['nbformat'] == 4 and notebook['nbformat_minor'] >= 5
  assert notebook['metadata']['kernelspec']['name'] == 'python3'
  ids = [c['id'] for c in notebook['cells']]
  assert len(set(ids)) == len(ids)
  code = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  for cell in notebook['cells']:
    assert cell['cell_type'] in ('markdown', 'code') and isinstance(cell['source'], list)
    if cell['cell_type'] == 'code':
      compile(_code(cell), cell['id'], 'exec')
  _check_outputs_are_one_run(notebook, code)
  try:
    import nbformat  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))


def _check_outputs_are_one_run(notebook, code):
  """No outputs at all, or every code cell's from one run in order (execution counts 1..n), with its record."""
  if all(c['execution_count'] is None and not c['outputs'] for c in code):
    assert _generator().EXECUTED not in notebook['metadata']
    return
  assert [c['execution_count'] for c in code] == list(range(1, len(code) + 1)), 'outputs of more than one run'
  record = notebook['metadata'][_generator().EXECUTED]
  assert record['seconds'] > 0 and record['date'] and record['machine']
  assert not any(o.get('output_type') == 'error' for c in code for o in c['outputs'])


def test_the_generator_keeps_outputs_only_while_every_cell_is_unchanged():
  generator = _generator()
  executed = generator.quickstart()
  for i, c in enumerate(c for c in executed['cells'] if c['cell_type'] == 'code'):
    c.update(execution_count=i + 1, outputs=[{'output_type': 'stream', 'name': 'stdout', 'text': [f'{i}\n']}])
  executed['metadata'][generator.EXECUTED] = dict(date='2026-12-01', seconds=1, machine='test')
  kept = generator.with_kept_outputs(generator.quickstart(), executed)
  assert kept == executed and generator.without_outputs(kept) == generator.quickstart()
  edited = generator.quickstart()
  next(c for c in edited['cells'] if c['id'] == 'load')['source'][0] += '# edited\n'
  assert generator.with_kept_outputs(edited, executed) == edited  # one cell changed: no outputs kept anywhere


def test_notebook_matches_its_generator():
  generator = _generator()
  assert generator.render(generator.without_outputs(_load(QUICKSTART))) == generator.render(generator.quickstart()), (
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
