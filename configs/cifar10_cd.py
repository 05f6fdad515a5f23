r"""CIFAR-10 consistency distillation (CD) with SFERD: the attention-guided teacher in the ODE step, then a semantic
gradient predictor on the consistency model.

  python -m sferd_jax.main --config=configs/cifar10_cd.py --workdir=runs/cifar10
  python -m sferd_jax.main --config=configs/cifar10_cd.py:method=pd --workdir=runs/cifar10_cd_plain  # plain CD

Starts from the teacher that configs/cifar10_teacher.py exported into the same --workdir (writing consistency/
beside distill/), or from any exported model: --config.consistency.teacher=/path/to/model (e.g. PD's own teacher,
imported with `python -m sferd_jax.tools.import_pd`, README). The student starts as the teacher.
Taken from the consistency models' CD on CIFAR-10 (openai/consistency_models_cifar10, configs/cifar10_ve_cd.py):
N = 18 ODE intervals, Heun, target network theta- = theta (stop-gradient), batch 512, learning rate 4e-4 after a
warm-up of 10M images, no gradient clipping, exported EMA 0.9999, 800k updates, dropout 0. Where our maths differs:
the grid is uniform in t over the cosine log-SNR schedule (theirs: Karras' rho = 7 grid over sigma in [0.002, 80]),
Heun runs in z / sigma and alpha / sigma (diffusion/consistency.py says why), the distance is pseudo-Huber (LPIPS
needs weights downloaded), the optimizer is Adam (theirs RAdam), and the network is PD's U-Net (theirs NCSN++).
Expected runtime: not yet measured for this code on a GPU. One step costs about two PD distillation steps at the
same batch (two teacher calls, the target network and the student): ~4x a batch-128 PD step at batch 512, i.e.
~0.5 s on one H200 by the PD anchor's 125 ms (bench/), ~110 hours for 800k updates; scale the updates to the budget.
Expected result: the consistency models paper reports one-step FID 3.55 and two-step 2.93 for CD (LPIPS) on
CIFAR-10; nothing is known for SFERD on CD. Score with --mode=evaluate --config.evaluate.inception_weights=<npz>.
"""

from sferd_jax import config as config_lib


def get_config(arg=''):
  args = config_lib.parse_arg(arg, method='sferd')
  config = config_lib.base_config()
  config.phases = ('consistency', 'semantic', 'latent')
  config.data.update(name='cifar10', random_flip=True)
  config.model.update(config_lib.CIFAR10_UNET, dropout=0.0)
  config.consistency = config_lib.consistency_config(
      train_steps=800_000, batch_size=512, learning_rate=4e-4, warmup_steps=10_000_000 // 512, grad_clip=0.0,
      ema_decay=0.9999, steps_per_call=10, log_every=100, checkpoint_every=5000, sample_every=50_000, num_steps=1,
      solver='heun', num_scales=18, target_decay=0.0)
  config.consistency.semantic = True
  config.sferd.attention_guidance.enabled = True
  config.sferd.semantic.update(stages=(), latent_dim=128, encoder_ch=64)  # the consistency model's predictor only
  config.sferd.latent.update(num_layers=10, width=2048, num_steps=100)
  config.semantic = config_lib.training_config(
      train_steps=50_000, batch_size=128, learning_rate=1e-4, steps_per_call=10, log_every=100,
      checkpoint_every=5000)
  config.latent = config_lib.training_config(
      train_steps=50_000, batch_size=512, learning_rate=1e-3, weight_decay=0.01, ema_decay=0.9999, loss='eps_mse',
      steps_per_call=10, log_every=500, checkpoint_every=10_000)
  config.evaluate.update(models=('consistency', 'consistency@2'), features='inception', num_samples=50_000,
                         round_size=2500, semantic=(False, True))
  config.sample.update(num_samples=64, batch_size=512)
  config_lib.apply_method(config, args.method)
  return config_lib.lock(config)
