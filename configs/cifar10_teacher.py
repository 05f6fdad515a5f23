r"""CIFAR-10 base model (the teacher): progressive distillation's CIFAR-10 U-Net and training settings.

  python -m sferd_jax.main --config=configs/cifar10_teacher.py --workdir=runs/cifar10

Needs CIFAR-10 prepared once as a TFDS array_record dataset (README, "Data"). Settings are PD's config/cifar_base.py:
60.0M-parameter U-Net, x-prediction, snr_trunc loss, batch 128, Adam(W) 2e-4 with 1k warm-up and weight decay
1e-3, EMA 0.9999, dropout 0.2, random flips. PD's config sets no length; 800k steps is DDPM's CIFAR-10 length.
Expected runtime: not yet measured for this code on a GPU. The PD anchor's train step takes 83.5 ms at batch 128
on one H200 (shared/research/anchor_gpu_bench.md), which would make 800k steps about 19 hours.
Expected result: not reproduced here yet (evaluate with --mode=evaluate; README, "Evaluation").
"""

from sferd_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.phases = ('teacher',)
  config.data.update(name='cifar10', random_flip=True)
  config.model.update(config_lib.CIFAR10_UNET)
  config.teacher = config_lib.training_config(
      train_steps=800_000, batch_size=128, learning_rate=2e-4, warmup_steps=1000, weight_decay=1e-3,
      ema_decay=0.9999, loss='snr_trunc', grad_clip=1.0, steps_per_call=10, log_every=100, checkpoint_every=5000,
      keep_checkpoints=2, sample_every=50_000)
  config.distill.start_num_steps = 8192  # the teacher's sampling steps, as in PD's CIFAR-10 distillation
  config.sample.update(num_samples=64, batch_size=512)
  return config_lib.lock(config)
