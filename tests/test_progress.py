"""The logs' account of time: ETAs, and the whole run's progress."""

import math

from sferd_jax import progress


def test_run_progress_counts_jobs_and_prices_each_phase_at_its_own_rate():
  now = [0.0]
  run = progress.RunProgress({'teacher': (1, 1000), 'distill': (2, 500), 'latent': (2, 1000)}, clock=lambda: now[0])
  assert run.total_jobs == 5 and run.eta() == math.inf
  run.job_done('teacher', trained=False)  # a resumed run: the teacher was already exported
  assert run.line('x').startswith('pipeline: x; 1/5 jobs done, 0m00s elapsed, ETA ?')
  now[0] = 100.0
  run.job_done('distill', trained=True)  # 500 images in 100 s: 0.2 s each, the run's average so far
  # 500 distill images at 0.2 s, and 2000 latent images at the average (0.2 s) until a latent job has run.
  assert run.eta() == 500.0 and '2/5 jobs done, 1m40s elapsed, ETA 8m20s' in run.line('x')
  now[0] = 200.0
  run.job_done('distill', trained=True)
  now[0] = 250.0  # an evaluation, say, between the phases: not a job's time
  run.phase_starts()
  now[0] = 260.0
  run.job_done('latent', trained=True)  # 1000 images in 10 s: its own rate prices the last latent job
  assert run.eta() == 10.0
  run.job_done('latent', trained=True)
  assert run.eta() == 0.0


def test_format_eta():
  assert progress.format_eta(math.inf) == '?'
  assert progress.format_eta(187) == '3m07s' and progress.format_eta(3900) == '1h05m'
