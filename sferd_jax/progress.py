"""What the logs say about time: shared by the training loop and the evaluation, so both read alike."""

import math
import time


def format_eta(seconds):
  """'1h05m', '3m07s', or '?' when the estimate is not finite yet."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class RunProgress:
  """A whole run's progress, for a person planning around it: jobs done of all planned (a job is the teacher, one
  stage, one predictor or latent model), time elapsed, and an ETA for the rest of the run, from the images trained
  so far in this run against the images left (finished jobs skipped by a resumed run count as done, but not towards
  the rate). `planned` is {phase: (jobs, images per job)}."""

  def __init__(self, planned, clock=time.perf_counter):
    self.planned, self.clock, self.start = dict(planned), clock, clock()
    self.total_jobs = sum(jobs for jobs, _ in self.planned.values())
    self.jobs_done, self.images_left, self.images_trained = 0, sum(j * n for j, n in self.planned.values()), 0

  def job_done(self, phase, *, trained):
    self.jobs_done += 1
    images = self.planned[phase][1]
    self.images_left -= images
    self.images_trained += images if trained else 0

  def eta(self):
    elapsed = self.clock() - self.start
    if not self.images_left:
      return 0.0
    return self.images_left * elapsed / self.images_trained if self.images_trained else math.inf

  def line(self, what):
    return (f'pipeline: {what}; {self.jobs_done}/{self.total_jobs} jobs done, '
            f'{format_eta(self.clock() - self.start)} elapsed, ETA {format_eta(self.eta())} for the rest of the run')
