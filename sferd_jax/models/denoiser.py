"""A U-Net's raw output -> Prediction(x, eps, v): the one place training and sampling apply a model."""

from sferd_jax.diffusion import process
from sferd_jax.models import unet


def labels_or_none(model_config, labels):
  """Unconditional models take no labels, whatever the batch carries."""
  return labels if model_config.num_classes else None


def denoise(model, params, z, logsnr, labels=None, *, output_type, train=False, dropout_rng=None):
  rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
  out = model.apply({'params': params}, z, logsnr, labels, train=train, rngs=rngs)
  return process.predict(output=out, z=z, logsnr=logsnr, output_type=output_type)


def denoise_with_attention(model, params, z, logsnr, labels=None, *, output_type, block):
  """Like denoise (inference mode), plus the attention probabilities (B, heads, T, T) sown by `block`.

  `model` must have been built with `block` in its capture_attention.
  """
  out, state = model.apply({'params': params}, z, logsnr, labels, train=False, mutable=['intermediates'])
  probs = unet.attention_probs(state['intermediates'])
  if block not in probs:
    raise ValueError(f'attention block {block!r} sowed nothing; the model captures {sorted(probs)}')
  return process.predict(output=out, z=z, logsnr=logsnr, output_type=output_type), probs[block]
