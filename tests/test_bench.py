"""bench/bench.py on the tiny config: one well-formed JSON line per measurement. Nothing here asserts on time."""

import contextlib
import importlib.util
import io
import json
import math
import os

import jax
import numpy as np
import pytest

from sferd_jax import sharding
from sferd_jax.training import loop
from sferd_jax.training import steps as steps_lib
import tiny

TINY = os.path.join(tiny.ROOT, 'configs', 'tiny.py')
# The tiny net with one resolution level: every code path still runs (attention, guidance at 8 x 8, the semantic
# encoder and shift decoder), and XLA:CPU compiles its steps in ~2/3 of the time.
OVERRIDES = (('model.ch_mult', (1,)), ('model.attn_resolutions', (8,)))
MEASURES = ['teacher', 'distill', 'distill_guided', 'consistency', 'semantic', 'sample', 'sample_semantic']
META = {'measure': str, 'device_kind': str, 'platform': str, 'device_count': int, 'jax_version': str,
        'flax_version': str, 'config': str, 'overrides': dict, 'dtype': str, 'batch_size': int}
TIMING = ('median_ms', 'min_ms', 'images_per_s', 'gflop_per_step', 'tflops_per_s')


def _load_bench():
  spec = importlib.util.spec_from_file_location('bench_under_test', os.path.join(tiny.ROOT, 'bench', 'bench.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load_bench()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """Every measurement once, 1 warm-up and 2 timed calls on one device: (records by measure, stdout lines, --out
  file lines)."""
  out = tmp_path_factory.mktemp('bench') / 'bench.jsonl'
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    records = bench.main([f'--config={TINY}', '--steps=2', '--warmup=1', '--num_devices=1', f'--out={out}']
                         + [f'--override={key}={value}' for key, value in OVERRIDES])
  return ({r['measure']: r for r in records}, stdout.getvalue().splitlines(), out.read_text().splitlines())


def test_one_json_line_per_measurement_on_stdout_and_in_the_out_file(run):
  records, stdout, out_file = run
  assert list(records) == MEASURES
  assert stdout == out_file
  assert [json.loads(line)['measure'] for line in stdout] == MEASURES


def test_every_line_carries_the_metadata(run):
  for record in run[0].values():
    for key, kind in META.items():
      assert isinstance(record[key], kind), (record['measure'], key)
    assert record['platform'] == 'cpu' and record['device_count'] == 1
    assert record['config'] == 'tiny' and record['dtype'] == 'float32' and record['batch_size'] == 8
    assert record['jax_version'] == jax.__version__
    assert record['overrides'] == {'model.ch_mult': [1], 'model.attn_resolutions': [8]}


def test_timings_flops_and_outputs_are_sane(run):
  for name, record in run[0].items():
    for key in TIMING:
      assert record[key] > 0, (name, key)
    assert record['min_ms'] <= record['median_ms']
    assert record['compile_s'] >= 0
    assert record['steps_timed'] == 2 and record['calls_timed'] == 2 and record['warmup'] == 1
    if name.startswith('sample'):
      assert record['finite'] and record['num_steps'] == 1
    else:
      assert math.isfinite(record['loss'])


def test_guided_record_compares_itself_with_the_plain_step(run):
  plain, guided = run[0]['distill'], run[0]['distill_guided']
  assert not plain['guided'] and guided['guided']
  assert guided['plain_median_ms'] == plain['median_ms']
  assert guided['ms_ratio'] == pytest.approx(guided['median_ms'] / plain['median_ms'])
  assert guided['meets_limit'] == (guided['ms_ratio'] <= guided['ratio_limit'] == 1.45)
  # Work, not time: the guided teacher's two extra forward passes are the only extra work of note (7 vs 5).
  assert guided['flop_ratio'] == pytest.approx(guided['forward_ratio'], abs=0.05)
  # The distill step is the student's forward and backward plus two teacher forwards: ~5/3 of a teacher step.
  assert plain['gflop_per_step'] / run[0]['teacher']['gflop_per_step'] == pytest.approx(5 / 3, abs=0.1)


def test_semantic_sampling_record_includes_the_latent_sampler(run):
  plain, shifted = run[0]['sample'], run[0]['sample_semantic']
  assert not plain['semantic'] and shifted['semantic'] and shifted['latent_steps'] == 4
  assert shifted['ms_ratio'] == pytest.approx(shifted['median_ms'] / plain['median_ms'])
  assert shifted['gflop_per_step'] > plain['gflop_per_step']  # the shift decoder and the latent model


def test_compile_step_counts_every_step_of_a_rolled_scan(run, monkeypatch):
  """Off CPU scan_steps keeps its loop rolled, and HLO cost analysis counts a loop body once: compile_step's count
  must still be steps_per_call x one step. The rolled loop is forced here by posing as a GPU to scan_steps."""
  config = bench.load_config(TINY, overrides=OVERRIDES)
  mesh = sharding.make_mesh(jax.devices()[:1])
  step, state, _ = bench.teacher_step(config, params=bench.unet_params(config), mesh=mesh)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  jitted = sharding.jit_step(steps_lib.scan_steps(step), mesh)
  flops, lowered = {}, {}
  for k in (1, 3):  # lowered only, never compiled
    args = (state, sharding.put_batch(bench.random_batches(config, batch_size=8, steps_per_call=k), mesh),
            jax.random.key(0))
    lowered[k] = jitted.lower(*args)
    flops[k] = loop._call_flops(jitted, lowered[k], args)  # pylint: disable=protected-access
  assert flops[1] / 1e9 == pytest.approx(run[0]['teacher']['gflop_per_step'])
  assert flops[3] == 3 * flops[1]
  assert loop.cost_flops(lowered[3]) == pytest.approx(flops[1], rel=0.01)


def test_summary_table_has_a_row_per_record(run):
  table = bench.summarize(list(run[0].values())).splitlines()
  assert len(table) == 2 + len(MEASURES)
  assert table[4].startswith('| distill_guided | cpu | tiny | float32 | 8 |')


def test_overrides_and_argument_errors():
  args = bench.parse_args(['--only=guided,sample', '--steps_per_call=2', '--override=model.ch=32',
                           '--override=sferd.attention_guidance.block=dec4_0_attn', '--override=model.ch_mult=(1,2)'])
  assert args.only == ['guided', 'sample'] and args.steps_per_call == 2 and args.config == TINY
  assert args.override == [('model.ch', 32), ('sferd.attention_guidance.block', 'dec4_0_attn'),
                           ('model.ch_mult', (1, 2))]
  config = bench.load_config(TINY, batch_size=4, dtype='bfloat16', overrides=args.override)
  assert config.model.dtype == 'bfloat16' and config.model.ch == 32
  assert config.sferd.attention_guidance.block == 'dec4_0_attn'
  assert {config[s].batch_size for s in bench.TRAIN_SECTIONS} == {4}
  for bad in (['--only=teacher,bogus'], ['--steps=0'], ['--dtype=float16'], ['--warmup=-1'], ['--override=model']):
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
      bench.parse_args(bad)
  with pytest.raises(ValueError, match='weight'):
    bench.with_guidance(tiny.load_config(**{'sferd.attention_guidance.weight': 0.0}), True)
  np.testing.assert_array_equal(bench.random_batches(config, batch_size=4, steps_per_call=2)['image'],
                                bench.random_batches(config, batch_size=4, steps_per_call=2)['image'])
