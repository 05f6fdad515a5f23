"""sferd_jax: SFERD distillation of diffusion models (arXiv 2311.03830) in JAX/Flax.

    from sferd_jax import load, sample
    model = load('runs/quickstart')                    # the last finished stage of a run, or any exported model
    images = model.sample(jax.random.key(0), num_samples=16)   # uint8 (16, H, W, C), at the model's step count
    images = sample(model.params, rng, model_config=model.config.model, num_samples=16, num_steps=4)
"""

__version__ = '0.1.0'
__all__ = ['Model', 'load', 'sample']


def __getattr__(name):
  # Lazy, so `import sferd_jax.config` (every config file does it) does not import JAX.
  if name in ('Model', 'load'):
    from sferd_jax import exports  # pylint: disable=g-import-not-at-top
    return getattr(exports, name)
  if name == 'sample':
    from sferd_jax import sampling  # pylint: disable=g-import-not-at-top
    return sampling.sample
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
