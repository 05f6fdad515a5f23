"""uint8 conversion, PNG grids of image batches, and the figures of plots."""

import math

from absl import logging
import numpy as np

from sferd_jax import files


def from_uint8(images):
  """uint8 [0, 255] -> float32 [-1, 1] (127.5 is exact in float32, so 0 -> -1 and 255 -> 1 exactly)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def to_uint8(x):
  """[-1, 1] floats -> uint8 [0, 255]."""
  return np.asarray(np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255), np.uint8)


def grid(images, *, columns=None, pad=1):
  """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, row-major, on a white ground."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return out


def save_grid(path, images, *, columns=None, scale=None, row_labels=None):
  """Writes a PNG grid; small images are enlarged (nearest) so a 16x16 sample is visible. row_labels: one text per
  row, written in a margin on the left of the image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = grid(images, columns=columns)
  scale = scale or max(1, 256 // max(np.asarray(images).shape[1], 1) // 2)
  image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
  picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if row_labels:
    picture = _with_row_labels(picture, row_labels, row_height=image.shape[0] / len(row_labels))
  with files.atomic_path(path) as tmp:
    picture.save(tmp)


def _with_row_labels(picture, labels, *, row_height):
  """The picture with a white margin on its left holding one label per row, each centred on its row."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(picture)
  boxes = [measure.textbbox((0, 0), label, font=font) for label in labels]
  margin = max(box[2] - box[0] for box in boxes) + 12
  out = Image.new(picture.mode, (picture.width + margin, picture.height), 255 if picture.mode == 'L' else
                  (255, 255, 255))
  out.paste(picture, (margin, 0))
  draw = ImageDraw.Draw(out)
  for r, (label, box) in enumerate(zip(labels, boxes)):
    draw.text((6, int((r + 0.5) * row_height - (box[3] - box[1]) / 2)), label, fill=0 if picture.mode == 'L' else
              (0, 0, 0), font=font)
  return out


def new_figure(figsize, *, purpose):
  """A matplotlib Figure on the Agg canvas (the object API: no pyplot, no global backend switch); `purpose` names
  what needs it in the error when matplotlib is missing."""
  try:
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{purpose}: matplotlib is needed (pip install matplotlib)') from e
  fig = figure.Figure(figsize=figsize, layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  return fig


def optional_figure(figsize, *, purpose):
  """new_figure, or None (and a log line) where matplotlib is missing: for plots that only accompany numbers
  written elsewhere (a loss curve beside metrics.jsonl, FID against steps beside results.json)."""
  try:
    return new_figure(figsize, purpose=purpose)
  except ImportError as e:
    logging.info('%s; skipped', e)
    return None


def save_figure(fig, path, *, dpi):
  """Writes a figure as the file its extension names, whole or not at all."""
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=dpi)
