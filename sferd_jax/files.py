"""Writing files so that a reader (or a run killed mid-write) sees the whole file or the previous one, never half."""

import os


def write_text_atomic(path, text):
  """Writes text beside `path`, then renames it into place (creating the folder)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)
