r"""ImageNet 64x64 SFERD distillation (class-conditional): 1024 -> 1 steps, attention-guided teacher, predictor.

  python -m sferd_jax.main --config=configs/imagenet64_stage.py --workdir=runs/imagenet64
  python -m sferd_jax.main --config=configs/imagenet64_stage.py:method=pd --workdir=runs/imagenet64_pd  # plain PD

Starts from configs/imagenet64_teacher.py's export in the same --workdir, or --config.distill.teacher=<model>.
Distillation settings are PD's config/imagenet64_distill.py: 50k updates per halving, batch 2048, Adam 1e-4
annealed linearly to 0 per stage, clipping 1, no EMA, no dropout, 1024 -> 1 steps (10 stages). Attention guidance
uses the decoder's 32x32 block (the paper's most variance-correlated map), SFERD.md §3 defaults otherwise. The
4-, 2- and 1-step students each get a semantic predictor; its latent model is class-conditional, so
sample(labels=..., semantic=True) draws codes of those classes.
Expected runtime: not yet measured for this code. Expected result: the paper reports one-step FID 9.39.
"""

from sferd_jax import config as config_lib


def get_config(arg=''):
  args = config_lib.parse_arg(arg, method='sferd')
  config = config_lib.base_config()
  config.phases = ('distill', 'semantic', 'latent')
  config.data.update(name='imagenet64', random_flip=True)
  config.model.update(config_lib.IMAGENET64_UNET, dropout=0.0)
  config.distill = config_lib.distill_config(
      train_steps=50_000, batch_size=2048, learning_rate=1e-4, ema_decay=0.0, loss='snr_trunc', grad_clip=1.0,
      steps_per_call=10, log_every=100, checkpoint_every=5000, sample_every=25_000, start_num_steps=1024,
      end_num_steps=1)
  config.sferd.attention_guidance.enabled = True
  config.sferd.semantic.update(latent_dim=256, encoder_ch=64)  # predictors on the 1-, 2- and 4-step students
  # PDAE's latent DPM: an MLPSkipNet of width 2048 and 10 layers.
  config.sferd.latent.update(num_layers=10, width=2048, num_steps=100)
  config.semantic = config_lib.training_config(
      train_steps=50_000, batch_size=512, learning_rate=1e-4, steps_per_call=10, log_every=100,
      checkpoint_every=5000)
  config.latent = config_lib.training_config(
      train_steps=50_000, batch_size=2048, learning_rate=1e-3, weight_decay=0.01, ema_decay=0.9999, loss='eps_mse',
      steps_per_call=10, log_every=500, checkpoint_every=10_000)
  config.evaluate.update(features='inception', num_samples=50_000, round_size=2500, semantic=(False, True))
  config.sample.update(num_samples=64, batch_size=256)
  config_lib.apply_method(config, args.method)
  return config_lib.lock(config)
