"""A fake Google Cloud Storage for tests: gs:// paths without the network.

Two views of one in-memory store, so that everything that touches a gs:// run folder meets the same objects:
- fsspec's 'gs' protocol, which etils.epath (and so this project and Orbax's file operations) uses for gs:// when
  TensorFlow is absent;
- the GCS JSON API on a localhost HTTP server, which TensorStore (Orbax's array writer) talks to when
  TENSORSTORE_GCS_HTTP_URL points at it. The requests served are the ones TensorStore's own GCS mock serves
  (tensorstore/kvstore/gcs_http/gcs_mock.cc): object get (metadata or media, with generation conditions), simple
  media upload, delete and list.

Like GCS, the store holds objects only: a "folder" exists while an object has its prefix, and a rename is a copy
and a delete. Use `with fake_gcs.bucket() as store:` (or the pytest fixture in conftest.py)."""

import contextlib
import http.server
import importlib.machinery
import io
import json
import os
import re
import sys
import threading
import types
import urllib.parse

import fsspec
from fsspec.spec import AbstractFileSystem


class Store:
  """bucket/object name -> (bytes, generation), thread-safe."""

  def __init__(self):
    self.objects = {}
    self.lock = threading.Lock()
    self._generation = 0

  def put(self, key, data, if_generation_match=None):
    with self.lock:
      current = self.objects.get(key)
      if if_generation_match is not None:
        if (if_generation_match == 0 and current) or (if_generation_match and
                                                      (not current or current[1] != if_generation_match)):
          return None
      self._generation += 1
      self.objects[key] = (bytes(data), self._generation)
      return self._generation

  def get(self, key):
    with self.lock:
      return self.objects.get(key)

  def delete(self, key):
    with self.lock:
      return self.objects.pop(key, None) is not None

  def keys(self, prefix=''):
    with self.lock:
      return sorted(k for k in self.objects if k.startswith(prefix))


STORE = Store()


class FakeGCSFileSystem(AbstractFileSystem):
  """fsspec over STORE with GCS's semantics (no folders of their own; paths 'bucket/name')."""

  protocol = ('gs', 'gcs')
  root_marker = ''
  cachable = False

  def __init__(self, *args, **kwargs):
    kwargs.pop('finalize_on_close', None)  # what etils passes to gcsfs
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip('/')

  def _info_of(self, path, data):
    return {'name': path, 'size': len(data[0]), 'type': 'file', 'generation': data[1]}

  def info(self, path, **kwargs):
    path = self._strip_protocol(path)
    data = STORE.get(path)
    if data is not None:
      return self._info_of(path, data)
    if not path or STORE.keys(path + '/'):
      return {'name': path, 'size': 0, 'type': 'directory'}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    path = self._strip_protocol(path)
    data = STORE.get(path)
    if data is not None:
      entries = [self._info_of(path, data)]
    else:
      prefix = path + '/' if path else ''
      children = {}
      for key in STORE.keys(prefix):
        head, sep, _ = key[len(prefix):].partition('/')
        name = prefix + head
        children[name] = ({'name': name, 'size': 0, 'type': 'directory'} if sep else
                          self._info_of(name, STORE.get(name)))
      if not children:
        raise FileNotFoundError(path)
      entries = [children[k] for k in sorted(children)]
    return entries if detail else [e['name'] for e in entries]

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # GCS has no folders: they appear with their first object

  def makedirs(self, path, exist_ok=False):
    pass

  def rmdir(self, path):
    pass

  def rm_file(self, path):
    if not STORE.delete(self._strip_protocol(path)):
      raise FileNotFoundError(path)

  def _rm(self, path):
    self.rm_file(path)

  def rm(self, path, recursive=False, maxdepth=None):
    for p in [path] if isinstance(path, str) else path:
      key = self._strip_protocol(p)
      under = STORE.keys(key + '/') if recursive else []
      if not STORE.delete(key) and not under:
        raise FileNotFoundError(p)
      for k in under:
        STORE.delete(k)

  def cp_file(self, path1, path2, **kwargs):
    data = STORE.get(self._strip_protocol(path1))
    if data is None:
      raise FileNotFoundError(path1)
    STORE.put(self._strip_protocol(path2), data[0])

  def _open(self, path, mode='rb', **kwargs):
    path = self._strip_protocol(path)
    if 'r' in mode:
      data = STORE.get(path)
      if data is None:
        raise FileNotFoundError(path)
      return io.BytesIO(data[0])
    if 'a' in mode:
      raise NotImplementedError('GCS objects cannot be appended to')
    return _Upload(path)

  def created(self, path):
    raise NotImplementedError

  def modified(self, path):
    raise NotImplementedError


class _Upload(io.BytesIO):
  """The object appears, whole, when the file closes: a GCS upload."""

  def __init__(self, path):
    super().__init__()
    self.path = path

  def close(self):
    if not self.closed:
      STORE.put(self.path, self.getvalue())
    super().close()


class _Handler(http.server.BaseHTTPRequestHandler):
  """The GCS JSON API requests TensorStore sends."""

  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def _parse(self):
    url = urllib.parse.urlsplit(self.path)
    params = dict(urllib.parse.parse_qsl(url.query))
    parts = url.path.split('/')  # '', ['upload',] 'storage', 'v1', 'b', bucket, 'o', [name]
    upload = parts[1] == 'upload'
    if upload:
      del parts[1]
    bucket = parts[4]
    name = urllib.parse.unquote(parts[6]) if len(parts) > 6 else None
    return upload, bucket, name, params

  def _send(self, status, body=b'', headers=()):
    self.send_response(status)
    for k, v in headers:
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _metadata(self, bucket, name, data):
    return json.dumps({'kind': 'storage#object', 'name': name, 'bucket': bucket, 'generation': str(data[1]),
                       'metageneration': '1', 'size': str(len(data[0])),
                       'contentType': 'application/octet-stream',
                       'updated': '2026-01-01T00:00:00.000Z', 'timeCreated': '2026-01-01T00:00:00.000Z'}).encode()

  def do_GET(self):  # pylint: disable=invalid-name
    _, bucket, name, params = self._parse()
    if name is None:  # list
      prefix = f'{bucket}/' + params.get('prefix', '')
      start = params.get('pageToken') or params.get('startOffset') or ''
      end = params.get('endOffset')
      items = []
      for key in STORE.keys(prefix):
        obj = key[len(bucket) + 1:]
        if obj < start or (params.get('pageToken') and obj == start) or (end and obj >= end):
          continue
        items.append(json.loads(self._metadata(bucket, obj, STORE.get(key))))
      return self._send(200, json.dumps({'kind': 'storage#objects', 'items': items}).encode(),
                        [('Content-Type', 'application/json')])
    data = STORE.get(f'{bucket}/{name}')
    match, not_match = params.get('ifGenerationMatch'), params.get('ifGenerationNotMatch')
    if match is not None:
      if int(match) == 0:
        return self._send(412 if data else 204)
      if not data or data[1] != int(match):
        return self._send(412)
    if data is None:
      return self._send(404)
    if not_match is not None and int(not_match) == data[1]:
      return self._send(304)
    if params.get('alt') != 'media':
      return self._send(200, self._metadata(bucket, name, data), [('Content-Type', 'application/json')])
    headers = [('Content-Type', 'application/octet-stream'), ('x-goog-generation', str(data[1])),
               ('x-goog-metageneration', '1')]
    ranged = re.fullmatch(r'bytes=(\d*)-(\d*)', self.headers.get('Range', ''))
    if not ranged:
      return self._send(200, data[0], headers)
    size, (first, last) = len(data[0]), ranged.groups()
    start = int(first) if first else max(0, size - int(last))  # 'bytes=-n': the last n bytes
    end = min(int(last), size - 1) if first and last else size - 1
    return self._send(206, data[0][start:end + 1], headers + [('Content-Range', f'bytes {start}-{end}/{size}')])

  def do_POST(self):  # pylint: disable=invalid-name
    upload, bucket, _, params = self._parse()
    body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
    if not upload or params.get('uploadType') != 'media' or not params.get('name'):
      return self._send(400)
    name = params['name']
    match = params.get('ifGenerationMatch')
    generation = STORE.put(f'{bucket}/{name}', body, None if match is None else int(match))
    if generation is None:
      return self._send(412)
    return self._send(200, self._metadata(bucket, name, STORE.get(f'{bucket}/{name}')),
                      [('Content-Type', 'application/json')])

  def do_DELETE(self):  # pylint: disable=invalid-name
    _, bucket, name, params = self._parse()
    data = STORE.get(f'{bucket}/{name}')
    if data is None:
      return self._send(404)
    match = params.get('ifGenerationMatch')
    if match is not None and int(match) != data[1]:
      return self._send(412)
    STORE.delete(f'{bucket}/{name}')
    return self._send(204)


_server = None


def start():
  """Registers the fsspec view and starts the HTTP view (once per process); returns STORE."""
  global _server  # pylint: disable=global-statement
  fsspec.register_implementation('gs', FakeGCSFileSystem, clobber=True)
  # Orbax asks google-cloud-storage whether a bucket has a hierarchical namespace before it deletes a checkpoint:
  # the client, as much of it as that takes (the fake bucket has none).
  if 'google.cloud.storage' not in sys.modules:
    client = types.ModuleType('google.cloud.storage')
    client.__spec__ = importlib.machinery.ModuleSpec('google.cloud.storage', None)
    client.Client = lambda: types.SimpleNamespace(
        get_bucket=lambda name: types.SimpleNamespace(name=name, hierarchical_namespace_enabled=False))
    sys.modules['google.cloud.storage'] = client
  fsspec.register_implementation('gcs', FakeGCSFileSystem, clobber=True)
  if _server is None:
    _server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    _server.daemon_threads = True
    threading.Thread(target=_server.serve_forever, daemon=True).start()
    # TensorStore reads these once, when it first opens a gs:// store.
    os.environ['TENSORSTORE_GCS_HTTP_URL'] = f'http://127.0.0.1:{_server.server_address[1]}'
    os.environ['GOOGLE_AUTH_TOKEN_FOR_TESTING'] = 'fake'
  return STORE


@contextlib.contextmanager
def bucket():
  store = start()
  try:
    yield store
  finally:
    with store.lock:
      store.objects.clear()
