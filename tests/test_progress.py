"""The logs' account of time: ETAs, and the whole run's progress."""

import math

from sferd_jax import progress


def test_run_progress_counts_jobs_and_estimates_the_rest_from_what_this_run_trained():
  now = [0.0]
  run = progress.RunProgress({'teacher': (1, 1000), 'distill': (3, 500)}, clock=lambda: now[0])
  assert run.total_jobs == 4 and run.eta() == math.inf
  run.job_done('teacher', trained=False)  # a resumed run: the teacher was already exported
  assert run.line('x').startswith('pipeline: x; 1/4 jobs done, 0m00s elapsed, ETA ?')
  now[0] = 100.0
  run.job_done('distill', trained=True)  # 500 images in 100 s; 1000 left
  assert run.eta() == 200.0 and '2/4 jobs done, 1m40s elapsed, ETA 3m20s' in run.line('x')
  run.job_done('distill', trained=True)
  run.job_done('distill', trained=True)
  assert run.eta() == 0.0


def test_format_eta():
  assert progress.format_eta(math.inf) == '?'
  assert progress.format_eta(187) == '3m07s' and progress.format_eta(3900) == '1h05m'
