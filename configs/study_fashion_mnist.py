r"""The ablation study on Fashion-MNIST (16x16): does SFERD beat progressive distillation?

  python -m sferd_jax.main --config=configs/study_fashion_mnist.py --mode=study --workdir=runs/study

with the FID Inception's weights at runs/inception.npz (README, "Evaluation": `python -m
sferd_jax.evaluation.export_inception <default_1.pt> runs/inception.npz`), or --config.study.inception_weights=
to score with the classifier alone.

One teacher (a 0.44M-parameter U-Net, the quickstart's), distilled 32 -> 16 -> 8 -> 4 -> 2 -> 1 steps per arm and
distillation seed (seeds 0, 1, 2): PD, PD + attention guidance, PD + semantic predictor, full SFERD (both), on the
4-, 2- and 1-step students; controls: PD with the predictors' updates spent on distillation, and a predictor
trained on PD's target (capacity only); full SFERD in bfloat16 at seed 0. FID/KID in the features of a
Fashion-MNIST classifier trained on the train split, against 2,000 held-out test images; the first seed also at a
second sample seed; the fitting-error analysis of the teacher and the 1-step PD and SFERD students (sferd_jax/study.py).
Finished units (teacher, classifier, each seed's rows, the analysis) are mirrored into studies/fashion_mnist/, to be
committed: the same command on another machine restores them and runs only what is missing.
Needs Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`) or the idx files in
--config.data.data_dir.
Expected runtime: 2 h 20 min on a 2-core CPU (2026-12-01, partly beside the test suite): teacher 5 min, seed 0
~60 min (it also has the bfloat16 arm, a second sample seed and the analysis), seeds 1 and 2 ~40 min each; the
FID Inception on CPU is a third of each seed. On a GPU, a larger study is a flag away: --config.model.image_size=32
--config.distill.train_steps=2000 --config.semantic.train_steps=2000 ...
Expected result (studies/fashion_mnist/results.md): SFERD does not help here; R = FID(SFERD) / FID(PD) at 1 step
is 2.29 [2.01, 2.60] (classifier features), 1.92 [1.74, 2.12] (Inception); PD 17.2, SFERD 39.2 at 1 step.
"""

from sferd_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.name = 'fashion_mnist'
  config.model.update(image_size=16, channels=1, ch=16, emb_ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                      attn_resolutions=(8,), num_heads=1, head_dim=None, dropout=0.0, output_type='x')
  config.teacher = config_lib.training_config(
      train_steps=4000, batch_size=32, learning_rate=1e-3, warmup_steps=100, ema_decay=0.999, loss='snr_trunc',
      log_every=200, checkpoint_every=1000, sample_every=2000)
  config.distill = config_lib.distill_config(
      train_steps=200, batch_size=32, learning_rate=2e-4, loss='snr_trunc', log_every=100, checkpoint_every=200,
      start_num_steps=32, end_num_steps=1)
  config.sferd.semantic.update(latent_dim=32, encoder_ch=16)
  config.sferd.latent.update(num_layers=4, width=128, num_steps=50)
  config.semantic = config_lib.training_config(
      train_steps=300, batch_size=32, learning_rate=1e-3, log_every=100, checkpoint_every=300)
  config.latent = config_lib.training_config(
      train_steps=500, batch_size=128, learning_rate=1e-3, weight_decay=0.01, ema_decay=0.99, loss='eps_mse',
      log_every=250, checkpoint_every=500)
  config.evaluate.update(num_samples=2000, round_size=1000, features='classifier', reference_split='test',
                         kid_subset_size=1000, classifier_steps=3000)
  config.analyze.update(num_images=32, num_noises=8)
  config.study = config_lib.study_config(seeds=(0, 1, 2), steps=(4, 2, 1), bf16_seed=0,
                                          results_dir='studies/fashion_mnist', inception_weights='runs/inception.npz')
  return config_lib.lock(config)
