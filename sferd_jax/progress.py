"""What the logs say about time: shared by the training loop and the evaluation, so both read alike."""

import math


def format_eta(seconds):
  """'1h05m', '3m07s', or '?' when the estimate is not finite yet."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'
