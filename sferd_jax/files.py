"""Writing files so that a reader (or a run killed mid-write) sees the whole file or the previous one, never half."""

import contextlib
import json
import os
import shutil


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
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
    elif os.path.exists(tmp):
      os.remove(tmp)
