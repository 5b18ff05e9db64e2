"""A local Cloud Storage emulator for the tests: gcp-storage-emulator plus two small fixes.

Run as a process:  python tests/gcs_emulator.py [BUCKET ...]
It binds 127.0.0.1 on a free port (port 0), creates the buckets, and prints one line
"READY <port>" on stdout once it accepts connections. Stop it with SIGTERM.

Fixes applied to gcp-storage-emulator 2026.7.19 (pure Python, JSON API):
 1. Media downloads (alt=media) carry X-Goog-Generation / X-Goog-Metageneration headers.
  Without them tensorstore records generation 0 for ranged reads, and its next
  conditional read fails with "Malformed StorageGeneration" (orbax OCDBT saves of
  many arrays break).
 2. ifGenerationMatch / ifGenerationNotMatch preconditions on object GET and on
  media/multipart uploads (412 / 304), as real GCS does; the emulator ignores them.
Also: listen backlog 128 instead of socketserver's 5 (the server is single-threaded).
"""

import http.server
import signal
import sys
from http import HTTPStatus

from gcp_storage_emulator import server as _server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets as _buckets
from gcp_storage_emulator.handlers import objects as _objects

http.server.HTTPServer.request_queue_size = 128

_orig_download = _objects.download
_orig_get = _objects.get
_orig_insert = _objects.insert


def _q(request, key):
  v = request.query.get(key)
  return v[0] if v else None


def _current_generation(storage, bucket, name):
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def _precondition_failed(request, current):
  """412/304 status for the request's generation preconditions, or None."""
  match = _q(request, "ifGenerationMatch")
  if match is not None:
    if match == "0":
      if current is not None:
        return HTTPStatus.PRECONDITION_FAILED
    elif current != match:
      return HTTPStatus.PRECONDITION_FAILED
  not_match = _q(request, "ifGenerationNotMatch")
  if not_match is not None and current is not None and current == not_match:
    return HTTPStatus.NOT_MODIFIED
  return None


def _refused(request, response, storage) -> bool:
  """Answers 412 / 304 if the request's preconditions fail on an existing object."""
  bucket, name = request.params["bucket_name"], request.params["object_id"]
  current = _current_generation(storage, bucket, name)
  status = None if current is None else _precondition_failed(request, current)
  if status is not None:
    response.status = status
  return status is not None


def download(request, response, storage, *args, **kwargs):
  if _refused(request, response, storage):
    return
  bucket, name = request.params["bucket_name"], request.params["object_id"]
  _orig_download(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(bucket, name)
    response["X-Goog-Generation"] = str(obj["generation"])
    response["X-Goog-Metageneration"] = str(obj.get("metageneration", "1"))


def get(request, response, storage, *args, **kwargs):
  if _q(request, "alt") == "media":
    return download(request, response, storage)
  if _q(request, "softDeleted") is None and _refused(request, response, storage):
    return
  return _orig_get(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
  upload_type = _q(request, "uploadType")
  if upload_type in ("media", "multipart") and (
    _q(request, "ifGenerationMatch") is not None
  ):
    data = request.data  # read the body first, whatever the outcome
    if upload_type == "media":
      name = _q(request, "name")
    else:
      name = (data.get("meta") or {}).get("name") if isinstance(data, dict) else None
    if name:
      current = _current_generation(storage, request.params["bucket_name"], name)
      status = _precondition_failed(request, current)
      if status == HTTPStatus.PRECONDITION_FAILED:
        response.status = status
        response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return
  return _orig_insert(request, response, storage, *args, **kwargs)


_objects.download, _objects.get, _objects.insert = download, get, insert
for _regex, _handlers in _server.HANDLERS:
  for _method, _fn in list(_handlers.items()):
    _handlers[_method] = {_orig_download: download, _orig_get: get, _orig_insert: insert}.get(_fn, _fn)


def main(buckets):
  srv = _server.create_server("127.0.0.1", 0, in_memory=True)
  for b in buckets:
    _buckets.create_bucket(b, srv._storage)
  srv.start()
  port = srv._api._httpd.server_address[1]
  signal.signal(signal.SIGTERM, lambda *a: (srv.stop(), sys.exit(0)))
  print(f"READY {port}", flush=True)
  try:
    signal.pause()
  except KeyboardInterrupt:
    srv.stop()


if __name__ == "__main__":
  main(sys.argv[1:] or ["bucket"])
