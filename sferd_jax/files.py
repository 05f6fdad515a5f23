"""Every file of a run folder is read and written here, so that a run folder may be local or in a bucket (gs://,
s3://: any file system etils.epath reaches, which Orbax writes to natively); writes are whole-or-nothing: a reader
(or a run killed mid-write) sees the whole file or the previous one, never half; and the lock that keeps one run per
run folder.

Paths stay strings: os.path.join, dirname and basename are right for 'gs://bucket/a/b' too. What is different on a
bucket: there are no folders of their own (they appear with their first file), an object is written whole when its
upload ends (so an upload is already atomic, and there is no rename to make it so), nothing can be appended to, and
there are no locks."""

import contextlib
import datetime
import fcntl
import importlib
import json
import os
import shutil
import socket
import tempfile

from absl import logging
from etils import epath

from sferd_jax import errors

LOCK_FILE = '.lock'


def is_remote(path):
  """Whether `path` is a URL of an object store (gs://, s3://, ...) rather than a local path."""
  return '://' in os.fspath(path)


def absolute(path):
  """An absolute local path, or a bucket URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def _path(path):
  return epath.Path(os.fspath(path))


# What a bucket needs besides this package: etils reaches it through fsspec's file system for its scheme (gcsfs,
# s3fs), and for gs:// Orbax asks google-cloud-storage about the bucket before it deletes an old checkpoint.
BUCKET_NEEDS = {'gs': ('gcsfs', 'google-cloud-storage'), 's3': ('s3fs',)}


def check_reachable(path):
  """A bucket path whose packages are missing -> ConfigError saying what to install (before any training)."""
  if not is_remote(path):
    return
  import fsspec  # pylint: disable=g-import-not-at-top
  scheme = os.fspath(path).split('://', 1)[0]
  if scheme not in BUCKET_NEEDS:
    raise errors.ConfigError(f'{path}: {scheme}:// is not supported; use a local folder, gs:// or s3://')
  missing = []
  try:
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError):
    missing.append(BUCKET_NEEDS[scheme][0])
  if scheme == 'gs':
    try:
      importlib.import_module('google.cloud.storage')
    except ImportError:
      missing.append(BUCKET_NEEDS[scheme][1])
  if missing:
    raise errors.ConfigError(f'{path} is in a bucket, which needs {" and ".join(missing)}: pip install '
                             f'{" ".join(missing)}')


def exists(path):
  return _path(path).exists()


def isdir(path):
  return _path(path).is_dir()


def isfile(path):
  return _path(path).is_file()


def listdir(path):
  """The names in a folder; [] when it does not exist."""
  return sorted(p.name for p in _path(path).iterdir()) if isdir(path) else []


def glob(folder, pattern):
  """The paths in `folder` whose names match `pattern` (no '**'), sorted."""
  return sorted(os.path.join(folder, p.name) for p in _path(folder).glob(pattern)) if isdir(folder) else []


def makedirs(path):
  _path(path).mkdir(parents=True, exist_ok=True)


def open_file(path, mode='r'):
  """open() for local and bucket paths; text modes read and write UTF-8."""
  return _path(path).open(mode) if 'b' in mode else _path(path).open(mode, encoding='utf-8')


def read_text(path):
  with open_file(path) as f:
    return f.read()


def read_bytes(path):
  with open_file(path, 'rb') as f:
    return f.read()


def read_json(path):
  return json.loads(read_text(path))


def size_and_mtime(path):
  """(size in bytes, modification time) of a file: what tells a changed file from the one last read."""
  if not is_remote(path):
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
  stat = _path(path).stat()
  return stat.length, stat.mtime


@contextlib.contextmanager
def load_npz(path):
  """np.load of an .npz, never unpickling, from a local or bucket path."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with open_file(path, 'rb') as f, np.load(f, allow_pickle=False) as data:
    yield data


def remove(path):
  """Removes a file or a folder tree; nothing when it does not exist."""
  p = _path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def copy(src, dst):
  """Copies a file (replacing `dst`) or a folder tree (into `dst`), local to bucket and back too."""
  if isdir(src):
    for name in listdir(src):
      copy(os.path.join(src, name), os.path.join(dst, name))
  else:
    makedirs(os.path.dirname(absolute(dst)))
    _path(src).copy(_path(dst), overwrite=True)


def move(src, dst):
  """Moves a file or folder. Local: a rename. Bucket: a copy, then the source removed."""
  makedirs(os.path.dirname(absolute(dst)))
  if is_remote(src) or is_remote(dst):
    copy(src, dst)
    remove(src)
  else:
    os.replace(src, dst)


def write_text_atomic(path, text):
  """Writes text beside `path`, then renames it into place (creating the folder)."""
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)


def write_json_atomic(path, value, **dump_kwargs):
  """write_text_atomic of json.dumps(value, indent=2)."""
  write_text_atomic(path, json.dumps(value, indent=2, **dump_kwargs))


def append_text(path, text):
  """Appends to a text file. On a bucket, where objects cannot grow, the file is rewritten whole (fine for the
  small logs this is for)."""
  if is_remote(path):
    old = read_text(path) if exists(path) else ''
    write_text_atomic(path, old + text)
  else:
    with open(path, 'a', encoding='utf-8') as f:
      f.write(text)


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary local path for a writer that wants a name (np.savez, matplotlib, a folder copy); moves it
  into place when the block ends without an error, removes it otherwise. Local: beside `path`, then a rename. Bucket:
  in a local temporary folder, then one upload per file (an object appears whole when its upload ends)."""
  path = absolute(path)
  folder, name = os.path.split(path)
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix='sferd_jax_upload_') as local:
      tmp = os.path.join(local, name)
      yield tmp
      if os.path.isdir(tmp):
        remove(path)  # a folder is uploaded file by file: not atomic, unlike one file replacing another
      copy(tmp, path)
    return
  os.makedirs(folder, exist_ok=True)
  # Hidden, and the name kept at the end: np.savez and savefig choose the format by the extension, and a leftover
  # of a killed writer matches no reader's pattern (round_*.npz, reference_*.npz).
  tmp = os.path.join(folder, f'.tmp{os.getpid()}.{name}')
  _remove_local(tmp)  # left by a killed writer whose process id this one now has
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    _remove_local(tmp)


def local_folder(path):
  """Where a writer that only writes local files (tensorboardX, jax.profiler) writes the folder `path`: `path`
  itself when local; for a bucket, a fresh local temporary folder, which upload_folder(local, path) then uploads and
  removes."""
  return tempfile.mkdtemp(prefix='sferd_jax_upload_') if is_remote(path) else path


def upload_folder(local, path):
  """Copies the files of local_folder(path) into the bucket folder `path` and removes the local copy, even when the
  upload fails (no temporary folder is left behind); nothing for a local `path`."""
  if not is_remote(path):
    return
  try:
    copy(local, path)
  finally:
    shutil.rmtree(local, ignore_errors=True)


def _remove_local(path):
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


@contextlib.contextmanager
def run_lock(folder):
  """Holds an advisory lock on <folder>/.lock while the block runs. A second run in the folder fails at once with
  RunLockedError naming the holder's pid and host. The operating system drops the lock when its process ends, kill -9
  included, so no stale lock is ever left to clear by hand. Where the file system has no locks (a bucket, some
  network file systems), a warning, and the block runs unlocked."""
  if is_remote(folder):
    logging.warning('%s is in a bucket, which has no locks: nothing stops a second run in this folder', folder)
    yield
    return
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
