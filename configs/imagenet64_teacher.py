r"""ImageNet 64x64 base model (class-conditional teacher): progressive distillation's ImageNet-64 settings.

  python -m sferd_jax.main --config=configs/imagenet64_teacher.py --workdir=runs/imagenet64

Needs imagenet_resized/64x64 prepared as a TFDS array_record dataset (README, "Data"). Settings are PD's
config/imagenet64_base.py: 295.9M-parameter U-Net (ch 192, mult 1-2-3-4, attention at 32/16/8, head dim 64),
'both' output, snr_trunc, batch 2048, Adam 3e-4 with 1k warm-up, EMA 0.9999, dropout 0.1, random flips.
PD's config sets no length; 500k steps is our choice. Use a TPU pod or several GPUs (launch/).
Expected runtime: not yet measured for this code. Expected result: not reproduced here yet.
"""

from sferd_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.phases = ('teacher',)
  config.data.update(name='imagenet64', random_flip=True)
  config.model.update(config_lib.IMAGENET64_UNET)
  config.teacher = config_lib.training_config(
      train_steps=500_000, batch_size=2048, learning_rate=3e-4, warmup_steps=1000, ema_decay=0.9999,
      loss='snr_trunc', grad_clip=1.0, steps_per_call=10, log_every=100, checkpoint_every=5000, sample_every=50_000)
  config.distill.start_num_steps = 1024
  config.sample.update(num_samples=64, batch_size=256)
  return config_lib.lock(config)
