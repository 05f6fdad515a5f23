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
  stage, one predictor or latent model), time elapsed, and an ETA for the rest of the run. The ETA prices each
  phase's images left at that phase's own measured seconds per image once one of its jobs has trained in this run
  (a latent model's step costs a fraction of a U-Net's), at the run's average until then. Jobs a resumed run finds
  done count as done but price nothing. `planned` is {phase: (jobs, images per job)}."""

  def __init__(self, planned, clock=time.perf_counter):
    self.planned, self.clock = dict(planned), clock
    self.start = self.last = clock()
    self.total_jobs = sum(jobs for jobs, _ in self.planned.values())
    self.jobs_done = 0
    self.images_left = {phase: jobs * images for phase, (jobs, images) in self.planned.items()}
    self.trained = dict.fromkeys(self.planned, 0)
    self.seconds = dict.fromkeys(self.planned, 0.0)

  def phase_starts(self):
    """What came before (another phase's work, an evaluation) is no job's time."""
    self.last = self.clock()

  def job_done(self, phase, *, trained):
    now = self.clock()
    self.jobs_done += 1
    self.images_left[phase] -= self.planned[phase][1]
    if trained:
      self.trained[phase] += self.planned[phase][1]
      self.seconds[phase] += now - self.last
    self.last = now

  def eta(self):
    if not any(self.images_left.values()):
      return 0.0
    if not any(self.trained.values()):
      return math.inf
    average = sum(self.seconds.values()) / sum(self.trained.values())
    return sum(left * (self.seconds[p] / self.trained[p] if self.trained[p] else average)
               for p, left in self.images_left.items())

  def line(self, what):
    return (f'pipeline: {what}; {self.jobs_done}/{self.total_jobs} jobs done, '
            f'{format_eta(self.clock() - self.start)} elapsed, ETA {format_eta(self.eta())} for the rest of the run')
