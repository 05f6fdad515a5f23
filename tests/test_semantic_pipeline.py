"""The semantic gradient predictor wired in: its phase, the latent phase, load() and sample(semantic=True)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from sferd_jax import config as config_lib
from sferd_jax import data as data_lib
from sferd_jax.data import codes as codes_lib
from sferd_jax import errors
from sferd_jax import exports
from sferd_jax import images as images_lib
from sferd_jax import layout
from sferd_jax.models import semantic as semantic_lib
from sferd_jax import pipeline
from sferd_jax import sampling
from sferd_jax.training import checkpointing
from sferd_jax.training import phases
import tiny


def _stage(workdir):
  return os.path.join(workdir, 'distill', 'stage_2')


def test_semantic_phase_trains_only_the_predictor(tiny_run):
  workdir, _ = tiny_run
  config = tiny.load_config()
  model = exports.load(_stage(workdir))
  assert model.has_semantic and model.config.num_steps == 1
  # The student the predictor was trained on is the stage's export, bit for bit.
  info = exports.read_info(os.path.join(_stage(workdir), 'semantic', 'model'))
  assert info['student'] == model.path
  meta_fingerprint = exports.fingerprint(model.params)
  assert checkpointing.PhaseCheckpoints(os.path.join(_stage(workdir), 'semantic'), keep=1).restore_meta(
      config.semantic.train_steps)['config']['student'] == meta_fingerprint
  # Only E_phi and G_tau are trained state; G_tau's zero-initialised output has learnt. (At g = 0 the encoder
  # gets exactly zero gradient, so after the tiny run's 2 steps it has barely moved; the sharded-step test below
  # shows one step from a trained predictor moves both.)
  trained = model.semantic.params
  assert sorted(trained) == ['encoder', 'predictor']
  assert np.any(trained['predictor']['conv_out']['kernel'])


def test_semantic_sampling_is_deterministic_and_optional(tiny_run):
  workdir, _ = tiny_run
  model = exports.load(workdir)  # the run folder -> its last stage, with its predictor
  shifted = model.sample(jax.random.key(3), num_samples=4, semantic=True)
  again = model.sample(jax.random.key(3), num_samples=4, semantic=True)
  plain = model.sample(jax.random.key(3), num_samples=4)
  np.testing.assert_array_equal(shifted, again)
  assert shifted.shape == plain.shape == (4, 8, 8, 1) and shifted.dtype == np.uint8
  # Off gives the plain student, exactly.
  np.testing.assert_array_equal(plain, sampling.sample(model.params, jax.random.key(3), model_config=model.config.model,
                                                       num_samples=4, num_steps=1))


def test_zero_predictor_output_gives_the_plain_student(tiny_run):
  workdir, _ = tiny_run
  model = exports.load(workdir)
  predictor = dict(model.semantic.params['predictor'])
  predictor['conv_out'] = jax.tree.map(jnp.zeros_like, predictor['conv_out'])
  zeroed = exports.SemanticPredictor(params=dict(model.semantic.params, predictor=predictor),
                                     latent_params=model.semantic.latent_params, stats=model.semantic.stats,
                                     config=model.semantic.config)
  kwargs = dict(model_config=model.config.model, num_samples=4, num_steps=1)
  np.testing.assert_array_equal(sampling.sample(model.params, jax.random.key(4), semantic=zeroed, **kwargs),
                                sampling.sample(model.params, jax.random.key(4), **kwargs))


def test_a_sample_does_not_depend_on_the_call_that_drew_it(tiny_run):
  """Sample i's noise and, with the predictor, its code z_sem come from (rng, i) alone: the number of samples and
  the batch size do not change it."""
  workdir, _ = tiny_run
  model = exports.load(workdir)
  # A predictor with a strong, code-dependent output, so a different code shows in the uint8 images.
  predictor = dict(model.semantic.params['predictor'])
  predictor['conv_out'] = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(7), p.shape),
                                       predictor['conv_out'])
  strong = exports.SemanticPredictor(params=dict(model.semantic.params, predictor=predictor),
                                     latent_params=model.semantic.latent_params, stats=model.semantic.stats,
                                     config=model.semantic.config)
  kwargs = dict(model_config=model.config.model, num_steps=1)
  draws = {}
  for name, semantic in (('plain', None), ('semantic', strong)):
    sixteen = sampling.sample(model.params, jax.random.key(5), num_samples=16, batch_size=16, semantic=semantic,
                              **kwargs)
    eight = sampling.sample(model.params, jax.random.key(5), num_samples=8, batch_size=4, semantic=semantic, **kwargs)
    np.testing.assert_array_equal(sixteen[:8], eight)
    draws[name] = sixteen
  assert not np.array_equal(draws['plain'], draws['semantic'])  # the codes do reach the images


def test_a_stage_teacher_is_found_by_stage_in_a_moved_workdir(tiny_run, tmp_path):
  """The semantic phase derives a stage's teacher from the stage number, not model.json's absolute path, and
  checks it against the fingerprint the stage recorded."""
  import shutil  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  workdir, _ = tiny_run
  moved = str(tmp_path / 'moved')
  shutil.copytree(os.path.join(workdir, 'distill'), os.path.join(moved, 'distill'))
  config = tiny.load_config()
  student = exports.load(_stage(moved))
  assert student.config.teacher.startswith(workdir)  # the recorded path is the old one
  teacher_of = lambda config, stage, student: phases.load_teacher_of(
      phases.stage_teacher_path(config, moved, stage), student, what=f'distillation stage {stage}')
  params = teacher_of(config, 2, student)
  assert exports.fingerprint(params) == student.config.teacher_fingerprint
  stage1 = exports.load(os.path.join(moved, 'distill', 'stage_1'))
  with pytest.raises(errors.CheckpointError, match='teacher of distillation stage 1 is missing'):
    teacher_of(config, 1, stage1)  # the teacher phase's export was not copied
  wrong = tiny.load_config(**{'distill.teacher': _stage(moved) + '/model'})
  with pytest.raises(errors.CheckpointError, match='is not the model distillation stage 1 was distilled from'):
    teacher_of(wrong, 1, stage1)


def test_latent_model_and_statistics_restore(tiny_run):
  workdir, _ = tiny_run
  model = exports.load(workdir)
  info = exports.read_info(os.path.join(_stage(workdir), 'latent', 'model'))
  assert info['num_codes'] == 1797 and info['latent_dim'] == 8
  assert model.semantic.stats['mean'].shape == (8,) and np.all(np.asarray(model.semantic.stats['std']) > 0)
  assert model.semantic.config.latent.num_steps == tiny.load_config().sferd.latent.num_steps


def test_sharded_semantic_step_equals_single_device(tiny_run):
  workdir, _ = tiny_run
  config = tiny.load_config()
  student = exports.load(_stage(workdir))
  teacher = exports.load(student.config.teacher)
  spec = phases.build(config, 'semantic')
  params = student.semantic.params  # trained, so g != 0 and both parts get gradients
  batch = phases.make_batches(config, spec).get(0, 1)
  (one, m1), (four, m4) = (tiny.run_step_on(devices, spec.step, lambda: spec.create(params), batch,
                                            (student.params, teacher.params, np.int32(1)))
                           for devices in (jax.devices()[:1], jax.devices()))
  # With g != 0 the gradient reaches both ends of E_phi (its first conv and its output layer) and G_tau.
  for part, layer in (('encoder', 'conv0'), ('encoder', 'out'), ('predictor', 'conv_out')):
    assert not np.array_equal(params[part][layer]['kernel'], one.params[part][layer]['kernel']), (part, layer)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['student_loss'], m4['student_loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['code_sensitivity'], m4['code_sensitivity'], rtol=1e-4)
  # Adam's first update is ~lr * sign(g): agreement to a fraction of one step (see test_guided_distill).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-5), one.params, four.params)


def test_semantic_stages_config():
  config = tiny.load_config()
  assert config_lib.semantic_stages(config) == [2]
  assert config_lib.semantic_stages(tiny.load_config(**{'sferd.semantic.stages': (1, -1)})) == [1, 2]
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match='does not exist'):
    config_lib.validate(tiny.load_config(**{'sferd.semantic.stages': (3,)}))


def test_encode_dataset_in_batches_equals_encoding_all_images_at_once():
  """Batch by batch, the last one padded: the same codes as one pass over the whole dataset, in order."""
  config = tiny.load_config()
  encoder, predictor = semantic_lib.make_semantic_models(config.model, config.sferd.semantic)
  params = jax.jit(lambda key: semantic_lib.init_semantic_params(encoder, predictor, key,
                                                                 model_config=config.model))(jax.random.key(0))
  source = data_lib.load_source(data_lib.data_config(config))
  encode = jax.jit(lambda x: encoder.apply({'params': params['encoder']}, x))
  codes, labels = codes_lib.encode_dataset(source, encode, batch_size=500)  # 3 x 500 + 297
  images, expected_labels = source.read(np.arange(len(source)))
  np.testing.assert_array_equal(labels, expected_labels)
  expected = encoder.apply({'params': params['encoder']}, images_lib.from_uint8(images))
  assert codes.shape == (len(source), config.sferd.semantic.latent_dim)
  np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-5)


def test_every_stage_gets_a_predictor_by_default_and_samples_with_it(tiny_run, tmp_path):
  """stages=None: the last three stages (here both): the semantic and latent phases train stage 1's predictor
  beside stage 2's (which they find finished), and each stage samples with its own."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run[0], workdir, ignore=shutil.ignore_patterns('evaluate'))
  config = tiny.load_config(**{'sferd.semantic.stages': None, 'phases': ('semantic', 'latent')})
  assert config_lib.semantic_stages(config) == [1, 2]
  stage2 = exports.fingerprint(exports.load(_stage(workdir)).semantic.params)
  pipeline.run_pipeline(config, workdir)
  for stage, steps in ((1, 2), (2, 1)):
    model = exports.load(os.path.join(workdir, 'distill', f'stage_{stage}'))
    assert model.has_semantic and model.config.num_steps == steps
    info = exports.read_info(os.path.join(workdir, 'distill', f'stage_{stage}', 'semantic', 'model'))
    assert info['semantic']['target'] == 'teacher_on_data' and 'stages' not in info['semantic']
    assert model.sample(jax.random.key(0), num_samples=4, semantic=True).shape == (4, 8, 8, 1)
    sensitivity = sampling.code_sensitivity(model, jax.random.key(1), num_samples=8)
    assert set(sensitivity) == {'code_sensitivity', 'shift_rms'}
    assert all(np.isfinite(v) and v >= 0 for v in sensitivity.values())
  # Stage 2's predictor was finished: skipped, not retrained.
  assert exports.fingerprint(exports.load(_stage(workdir)).semantic.params) == stage2
  with open(os.path.join(workdir, 'distill', 'stage_1', 'semantic', 'metrics.jsonl')) as f:
    assert all('code_sensitivity' in json.loads(line) for line in f)


def test_class_conditional_codes_follow_the_label():
  """A class-conditional latent model draws each sample's code for that sample's label: the same key with another
  label gives another code."""
  from sferd_jax.models import latent  # pylint: disable=g-import-not-at-top
  model_config = dict(num_classes=3)
  latent_config = dict(num_layers=3, width=16, num_steps=4)
  semantic_config = {'semantic': {'latent_dim': 4}, 'latent': latent_config, 'latent_num_classes': 3}
  model = latent.make_latent_model(latent_config, num_classes=3)
  params = jax.jit(lambda key: latent.init_latent_params(model, key, dim=4))(jax.random.key(0))
  # Random output layer and class embedding, so that the label reaches the codes.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jax.random.normal(jax.random.key(len(jax.tree_util.keystr(path))), p.shape)
      if 'out' in jax.tree_util.keystr(path) or 'class_emb' in jax.tree_util.keystr(path) else p, params)
  semantic_params = {'latent': params, 'stats': {'mean': jnp.zeros(4), 'std': jnp.ones(4)}}
  keys = jnp.stack([jax.random.key(1)] * 3)
  draw = jax.jit(lambda labels, cfg_classes: sampling._draw_codes(  # pylint: disable=protected-access
      model_config, {}, dict(semantic_config, latent_num_classes=cfg_classes), semantic_params, keys, labels),
                 static_argnums=1)
  codes = np.asarray(draw(jnp.array([0, 1, 2]), 3))
  assert not np.allclose(codes[0], codes[1]) and not np.allclose(codes[1], codes[2])
  np.testing.assert_array_equal(codes[0], np.asarray(draw(jnp.array([0, 0, 0]), 3))[0])


def test_exports_from_before_the_target_and_the_switch_off_still_load_and_sample(tiny_run, tmp_path):
  """A stage exported before `target`, `stop_fraction` and `gradient_param` (semantic) and `num_classes` (latent)
  were recorded: it loads, reads as PD's target without a switch-off, and samples as an export that has them."""
  import shutil  # pylint: disable=g-import-not-at-top
  from sferd_jax.sferd import semantic_predictor  # pylint: disable=g-import-not-at-top
  stage = str(tmp_path / 'stage_2')
  shutil.copytree(_stage(tiny_run[0]), stage, ignore=shutil.ignore_patterns('checkpoints'))
  for part, keys in (('semantic', ('target', 'stop_fraction', 'gradient_param')), ('latent', ('num_classes',))):
    path = os.path.join(stage, part, 'model', layout.MODEL_JSON)
    with open(path) as f:
      info = json.load(f)
    for key in keys:
      (info['semantic'] if part == 'semantic' else info).pop(key, None)
    with open(path, 'w') as f:
      json.dump(info, f)
  old = exports.load(stage)
  assert semantic_predictor.setting(old.semantic.config.semantic, 'target') == 'pd'
  assert semantic_predictor.setting(old.semantic.config.semantic, 'stop_fraction') == 0.0
  assert old.semantic.config.latent_num_classes == 0
  new = exports.load(_stage(tiny_run[0]))
  np.testing.assert_array_equal(old.sample(jax.random.key(2), num_samples=4, semantic=True),
                                new.sample(jax.random.key(2), num_samples=4, semantic=True))  # 1 step: no switch-off
  # stop_fraction is a sampling setting: overridden per call, validated.
  with np.testing.assert_raises(ValueError):
    new.sample(jax.random.key(2), num_samples=4, semantic=True, stop_fraction=1.0)


def test_stop_fraction_is_a_sampling_setting(tiny_run):
  """with_stop_fraction(0.5) at 2 steps leaves the last step unshifted: other images than shifting both steps,
  the same at 1 step (floor(0.5) = 0 steps off)."""
  model = exports.load(tiny_run[0])
  predictor = dict(model.semantic.params['predictor'])
  predictor['conv_out'] = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(7), p.shape),
                                       predictor['conv_out'])
  strong = exports.SemanticPredictor(params=dict(model.semantic.params, predictor=predictor),
                                     latent_params=model.semantic.latent_params, stats=model.semantic.stats,
                                     config=model.semantic.config).with_stop_fraction(0.0)
  draw = lambda semantic, steps: sampling.sample(model.params, jax.random.key(6), model_config=model.config.model,
                                                 num_samples=8, num_steps=steps, semantic=semantic)
  half = strong.with_stop_fraction(0.5)
  assert half.config.semantic.stop_fraction == 0.5 and strong.config.semantic.stop_fraction == 0.0
  assert not np.array_equal(draw(strong, 2), draw(half, 2))
  np.testing.assert_array_equal(draw(strong, 1), draw(half, 1))
