r"""Quickstart: SFERD end to end on the embedded digits dataset, offline, on any machine.

  python -m sferd_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  sferd --config=quickstart --workdir=runs/quickstart                     # the same, installed
  sferd --config=quickstart:method=pd --workdir=runs/quickstart_pd        # plain PD: no guidance, no predictor

Trains a small teacher on scikit-learn's 1,797 real 8x8 digits (resized to 16x16), distils it 32 -> 16 -> 8 -> 4
-> 2 -> 1 steps with the attention-guided teacher, and, from the same teacher, a consistency model (consistency
distillation with the guided teacher, CD); trains a semantic gradient predictor and its latent model on each of
the 4-, 2- and 1-step students and on the consistency model, and scores every model with a digits classifier (no
Inception weights needed): PD's students and the consistency model at 1 and 2 steps side by side.
Expected runtime and result: see README ("Quickstart"), measured on a 2-core CPU.
Writes runs/quickstart/teacher/samples/*.png (the teacher at 128 DDIM steps), samples/comparison.png (teacher at
32 steps above its 4-, 2- and 1-step students, same noise) and evaluate/results.md.
"""

from sferd_jax import config as config_lib


def get_config(arg=''):
  args = config_lib.parse_arg(arg, method='sferd')
  config = config_lib.base_config()
  config.phases = ('teacher', 'distill', 'consistency', 'semantic', 'latent', 'evaluate')
  config.data.name = 'digits'
  config.model.update(image_size=16, channels=1, ch=16, emb_ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                      attn_resolutions=(8,), num_heads=1, head_dim=None, dropout=0.0, output_type='x')
  config.teacher = config_lib.training_config(
      train_steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=100, ema_decay=0.999, loss='snr_trunc',
      log_every=100, checkpoint_every=500, sample_every=1000)
  config.distill = config_lib.distill_config(
      train_steps=150, batch_size=32, learning_rate=2e-4, loss='snr_trunc', log_every=50, checkpoint_every=150,
      start_num_steps=32, end_num_steps=1)
  # As many updates as the five PD stages together, each with two teacher calls (Heun) as a PD step has; the grid
  # of 16 intervals and the rest are the consistency models' CD settings (target = theta itself, pseudo-Huber in
  # place of LPIPS), the exported EMA shortened to this run's length.
  config.consistency = config_lib.consistency_config(
      train_steps=750, batch_size=32, learning_rate=2e-4, ema_decay=0.99, log_every=50, checkpoint_every=250,
      num_steps=1, solver='heun', num_scales=16, target_decay=0.0)
  config.consistency.semantic = True
  config.sferd.attention_guidance.enabled = True
  config.sferd.semantic.update(latent_dim=32, encoder_ch=16)
  config.sferd.latent.update(num_layers=4, width=128, num_steps=50)
  config.semantic = config_lib.training_config(
      train_steps=200, batch_size=32, learning_rate=1e-3, log_every=50, checkpoint_every=200)
  config.latent = config_lib.training_config(
      train_steps=500, batch_size=128, learning_rate=1e-3, weight_decay=0.01, ema_decay=0.99, loss='eps_mse',
      log_every=100, checkpoint_every=500)
  # Score what the comparison grid shows, the teacher and its 4-, 2- and 1-step students, then the consistency model
  # at 2 and 1 steps, each student also with its semantic predictor, in the feature space of a digits classifier
  # trained with the run; two sample seeds, so that a gap between variants can be told from sampling noise.
  config.evaluate.update(models=('teacher', 'distill/stage_3', 'distill/stage_4', 'distill/stage_5', 'consistency@2',
                                 'consistency@1'),
                         num_samples=500, round_size=250, features='auto', guidance=(False,), semantic=(False, True),
                         kid_subset_size=250, sample_seeds=(0, 1))
  config.sample.num_samples = 64
  config_lib.apply_method(config, args.method)
  return config_lib.lock(config)
