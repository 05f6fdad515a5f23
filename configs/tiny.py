r"""Tiny: the smallest config that exercises every code path; used by the tests and as bench/'s default.

  python -m sferd_jax.main --config=configs/tiny.py --workdir=runs/tiny

Expected: about a minute on a 2-core CPU, most of it compilation; the samples are noise (a few steps of training).
"""

from sferd_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.phases = ('teacher', 'distill', 'semantic', 'latent')
  config.data.name = 'digits'
  config.model.update(image_size=8, channels=1, ch=16, emb_ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), num_heads=2, head_dim=None, dropout=0.0, output_type='x')
  config.teacher = config_lib.training_config(
      train_steps=4, batch_size=8, learning_rate=1e-3, ema_decay=0.9, log_every=2, checkpoint_every=2,
      sample_every=0, steps_per_call=1)
  config.distill = config_lib.distill_config(
      train_steps=2, batch_size=8, learning_rate=1e-4, log_every=1, checkpoint_every=1, start_num_steps=4,
      end_num_steps=1)
  config.consistency = config_lib.consistency_config(
      train_steps=2, batch_size=8, learning_rate=1e-4, log_every=1, checkpoint_every=1, num_steps=2, num_scales=4,
      target_decay=0.5)
  config.sferd.semantic.update(stages=(-1,), latent_dim=8, encoder_ch=8)
  config.sferd.latent.update(num_layers=3, width=16, num_steps=4)
  config.semantic = config_lib.training_config(
      train_steps=2, batch_size=8, learning_rate=1e-4, log_every=1, checkpoint_every=1)
  config.latent = config_lib.training_config(
      train_steps=2, batch_size=8, learning_rate=1e-3, weight_decay=0.01, ema_decay=0.9, loss='eps_mse',
      log_every=1, checkpoint_every=1)
  config.sample.update(num_samples=8, num_steps=2, batch_size=8)
  return config_lib.lock(config)
