"""Training batches that are a pure function of (seed, step), so a resumed run sees exactly the same data.

Global position g = step * B + j (j < B) reads example perm(seed, g // N)[g % N] and is mirrored when
flips(seed, g // N)[g % N] is set; both come from a NumPy generator seeded with (seed, epoch), so no device work
and no state to checkpoint. Process p of P takes the contiguous slice [p B / P, (p + 1) B / P) of every global
batch, so hosts see disjoint parts and together the whole batch.
"""

import collections
import itertools
import queue
import threading
from typing import Any, Iterator, Mapping, Optional

from absl import logging
import numpy as np

from sferd_jax.data import sources

# Sources up to this size are read into memory once and gathered with fancy indexing (cifar10: 150 MB);
# larger ones (imagenet64: 15 GB) are read by index with threads.
IN_MEMORY_MAX_BYTES = 4 * 2**30
_EPOCH_CACHE = 4  # epochs whose order is kept; a call spans at most a few


def data_config(config):
  """A run config's data section plus the image shape, which its model section owns: what load_source reads."""
  return dict(config.data.to_dict(), image_size=config.model.image_size, channels=config.model.channels)


class Batches:
  """Deterministic, resumable, per-process batches of one source.

  `get(step, num_steps)` returns {'image': float32 (num_steps, local_batch, H, W, C) in [-1, 1],
  'label': int32 (num_steps, local_batch)} for global steps step .. step + num_steps - 1.
  """

  def __init__(self, source: sources.Source, *, global_batch_size: int, seed: int, random_flip: bool = False,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               in_memory: Optional[bool] = None, num_threads: int = 16):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of the process count '
                       f'({process_count})')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if len(source) == 0:
      raise ValueError(f'{source.describe()} is empty')
    if in_memory is None:
      in_memory = isinstance(source, sources.ArraySource) or source.nbytes <= IN_MEMORY_MAX_BYTES
    self.source = sources.materialize(source, num_threads) if in_memory else source
    self.in_memory = bool(in_memory)
    self.num_examples = len(source)
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.seed = int(seed)
    self.random_flip = bool(random_flip)
    self.num_threads = int(num_threads)
    self.image_shape = tuple(source.image_shape)
    self.num_classes = source.num_classes
    self._epochs = collections.OrderedDict()
    self._lock = threading.Lock()  # the prefetch thread and the caller may both ask for epoch orders

  @property
  def steps_per_epoch(self) -> float:
    return self.num_examples / self.global_batch_size

  def epoch_order(self, epoch: int):
    """(permutation int64 (N,), flips bool (N,)) of one epoch; a pure function of (seed, epoch)."""
    with self._lock:
      if epoch in self._epochs:
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]
    rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, int(epoch)]))
    # Drawn whether or not random_flip is set, so the order does not depend on it.
    order = rng.permutation(self.num_examples), rng.random(self.num_examples) < 0.5
    with self._lock:
      self._epochs[epoch] = order
      while len(self._epochs) > _EPOCH_CACHE:
        self._epochs.popitem(last=False)
    return order

  def indices(self, step: int, num_steps: int = 1):
    """This process's example indices int64 (num_steps, local_batch) and flips bool (same shape)."""
    if step < 0 or num_steps < 1:
      raise ValueError(f'step={step} must be >= 0 and num_steps={num_steps} >= 1')
    lo = self.process_index * self.local_batch_size
    g = (np.arange(step, step + num_steps, dtype=np.int64)[:, None] * self.global_batch_size
         + np.arange(lo, lo + self.local_batch_size, dtype=np.int64)[None, :])
    epoch, pos = np.divmod(g, self.num_examples)
    index = np.empty_like(g)
    flip = np.zeros(g.shape, bool)
    for e in np.unique(epoch):
      perm, flips = self.epoch_order(int(e))
      where = epoch == e
      index[where] = perm[pos[where]]
      flip[where] = flips[pos[where]]
    return index, flip & self.random_flip

  def get(self, step: int, num_steps: int = 1) -> dict[str, np.ndarray]:
    """The batches of global steps step .. step + num_steps - 1, for this process."""
    index, flip = self.indices(step, num_steps)
    images, labels = self.source.read(index.reshape(-1), num_threads=self.num_threads)
    x = images.astype(np.float32)
    flip = flip.reshape(-1)
    if flip.any():
      x[flip] = x[flip, :, ::-1]
    # 127.5 is exact in float32, so 0 -> -1 and 255 -> 1 exactly.
    np.divide(x, 127.5, out=x)
    x -= 1.0
    return {'image': x.reshape(index.shape + self.image_shape), 'label': labels.reshape(index.shape)}

  def iterate(self, start_step: int = 0, num_steps_per_call: int = 1, *, stop_step: Optional[int] = None,
              prefetch: int = 2) -> 'Prefetcher':
    """Yields get(s, num_steps_per_call) for s = start_step, start_step + num_steps_per_call, ...

    A background thread prepares the next `prefetch` results while the device works. Without stop_step it never
    ends; with it the last result may hold fewer steps. Close it (or use `with`) to stop the thread.
    """
    n = int(num_steps_per_call)
    if stop_step is None:
      calls = ((s, n) for s in itertools.count(start_step, n))
    else:
      calls = ((s, min(n, stop_step - s)) for s in range(start_step, stop_step, n))
    return Prefetcher(lambda call: self.get(*call), calls, prefetch)

  def describe(self) -> str:
    return (f'{self.source.describe()}; global batch {self.global_batch_size}, local batch {self.local_batch_size} '
            f'(process {self.process_index}/{self.process_count}), seed {self.seed}, random_flip {self.random_flip}, '
            f'{self.steps_per_epoch:.1f} steps/epoch' + ('' if self.in_memory else
                                                        f', read with {self.num_threads} threads'))

  def __repr__(self):
    return f'<Batches {self.describe()}>'


class Prefetcher:
  """An iterator over fn(arg) for arg in args, computed `prefetch` ahead in a daemon thread."""

  def __init__(self, fn, args, prefetch: int = 2):
    self._queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._done = False
    # The thread holds the queue and the event but not self, so an abandoned iterator is collected and stops it.
    self._thread = threading.Thread(target=_produce, args=(fn, args, self._queue, self._stop), daemon=True,
                                    name='sferd-data-prefetch')
    self._thread.start()

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    return item

  def close(self):
    self._stop.set()
    self._done = True
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    self._stop.set()


_END = object()


class _Failure:

  def __init__(self, error):
    self.error = error


def _produce(fn, args, out, stop):
  """Puts fn(arg) for each arg, then _END (or the error), until `stop` is set."""

  def put(item):
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for arg in args:
      if stop.is_set() or not put(fn(arg)):
        return
    put(_END)
  except BaseException as e:  # pylint: disable=broad-except
    logging.exception('Data prefetch failed')
    put(_Failure(e))


def load_batches(data_config: Mapping[str, Any], *, global_batch_size: int, seed: int, split: Optional[str] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 **kwargs) -> Batches:
  """load_source(data_config, split) batched with data_config.random_flip; kwargs go to Batches."""
  source = sources.load_source(data_config, split)
  return Batches(source, global_batch_size=global_batch_size, seed=seed, random_flip=bool(data_config['random_flip']),
                 process_index=process_index, process_count=process_count, **kwargs)
