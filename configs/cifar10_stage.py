r"""CIFAR-10 SFERD distillation: 8192 -> 1 steps with the attention-guided teacher, then the semantic predictor.

  python -m sferd_jax.main --config=configs/cifar10_stage.py --workdir=runs/cifar10
  python -m sferd_jax.main --config=configs/cifar10_stage.py:method=pd --workdir=runs/cifar10_pd  # plain PD

Starts from the teacher that configs/cifar10_teacher.py exported into the same --workdir, or from any exported
model: --config.distill.teacher=/path/to/model. Distillation settings are PD's config/cifar_distill.py: 50k updates
per halving, batch 128, Adam 5e-5 annealed linearly to 0 in each stage, clipping 1, no EMA, no dropout, 8192 -> 1
steps (13 stages; --config.distill.start_num_steps=1024 gives the shorter 10-stage chain). SFERD's attention
guidance (SFERD.md §3 defaults: decoder's 16x16 block, threshold 1, blur 15/3, w 0.3) guides every teacher
evaluation; a semantic predictor (target: the guided teacher on re-noised data, the official code's) and its
latent model are trained on each of the 4-, 2- and 1-step students.
Expected runtime: not yet measured for this code on a GPU. The PD anchor's distill step takes 125 ms at batch 128
on one H200; 13 x 50k steps at that rate is ~23 hours, and guidance adds ~40% teacher work (bench/).
Expected result: the paper reports one-step FID 5.31 (PD alone: 9.12 at 1 step, 4.51 at 2, 3.00 at 4). Score with
--mode=evaluate --config.evaluate.inception_weights=<npz> (README, "Evaluation").
"""

from sferd_jax import config as config_lib


def get_config(arg=''):
  args = config_lib.parse_arg(arg, method='sferd')
  config = config_lib.base_config()
  config.phases = ('distill', 'semantic', 'latent')
  config.data.update(name='cifar10', random_flip=True)
  config.model.update(config_lib.CIFAR10_UNET, dropout=0.0)
  config.distill = config_lib.distill_config(
      train_steps=50_000, batch_size=128, learning_rate=5e-5, ema_decay=0.0, loss='snr_trunc', grad_clip=1.0,
      steps_per_call=10, log_every=100, checkpoint_every=5000, sample_every=25_000, start_num_steps=8192,
      end_num_steps=1)
  config.sferd.attention_guidance.enabled = True
  config.sferd.semantic.update(latent_dim=128, encoder_ch=64)  # predictors on the 1-, 2- and 4-step students
  # PDAE's latent DPM: an MLPSkipNet of width 2048 and 10 layers.
  config.sferd.latent.update(num_layers=10, width=2048, num_steps=100)
  # Our choices (the paper gives none): one stage's worth of predictor training, PDAE's latent-model optimizer.
  config.semantic = config_lib.training_config(
      train_steps=50_000, batch_size=128, learning_rate=1e-4, steps_per_call=10, log_every=100,
      checkpoint_every=5000)
  config.latent = config_lib.training_config(
      train_steps=50_000, batch_size=512, learning_rate=1e-3, weight_decay=0.01, ema_decay=0.9999, loss='eps_mse',
      steps_per_call=10, log_every=500, checkpoint_every=10_000)
  config.evaluate.update(features='inception', num_samples=50_000, round_size=2500, semantic=(False, True))
  config.sample.update(num_samples=64, batch_size=512)
  config_lib.apply_method(config, args.method)
  return config_lib.lock(config)
