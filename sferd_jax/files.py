"""Writing files so that a reader (or a run killed mid-write) sees the whole file or the previous one, never half;
and the lock that keeps one run per run folder."""

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket

from absl import logging

from sferd_jax import errors

LOCK_FILE = '.lock'


def write_text_atomic(path, text):
  """Writes text beside `path`, then renames it into place (creating the folder)."""
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      f.write(text)


def write_json_atomic(path, value, **dump_kwargs):
  """write_text_atomic of json.dumps(value, indent=2)."""
  write_text_atomic(path, json.dumps(value, indent=2, **dump_kwargs))


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path beside `path` for a writer that wants a name (np.savez, matplotlib, a folder copy);
  renames it into place when the block ends without an error, removes it otherwise."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Hidden, and the name kept at the end: np.savez and savefig choose the format by the extension, and a leftover
  # of a killed writer matches no reader's pattern (round_*.npz, reference_*.npz).
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f'.tmp{os.getpid()}.{name}')
  _remove(tmp)  # left by a killed writer whose process id this one now has
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    _remove(tmp)


def _remove(path):
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


@contextlib.contextmanager
def run_lock(folder):
  """Holds an advisory lock on <folder>/.lock while the block runs. A second run in the folder fails at once with
  RunLockedError naming the holder's pid and host. The operating system drops the lock when its process ends, kill -9
  included, so no stale lock is ever left to clear by hand. Where the file system has no locks (some network file
  systems), a warning, and the block runs unlocked."""
  path = os.path.join(folder, LOCK_FILE)
  try:
    os.makedirs(folder, exist_ok=True)
    f = open(path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
  except OSError as e:
    raise errors.ConfigError(f'{folder} is not writable ({e}); choose another --workdir') from None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'a process that has not written its name yet'
      raise errors.RunLockedError(
          f'{folder} is in use by another run: {holder}. Two runs in one folder would overwrite each other\'s '
          f'checkpoints; wait for it to end or stop it, or use another --workdir. (The lock ends with its process: '
          f'there is nothing to delete.)') from None
    except OSError as e:
      logging.warning('%s: this file system cannot lock files (%s); nothing stops a second run in this folder', path,
                      e)
      yield
      return
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n')
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)
