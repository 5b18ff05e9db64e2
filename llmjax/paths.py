"""The one path layer: local paths and URLs (`gs://bucket/...`) alike, through `etils.epath`
(as Orbax itself). Nothing under llmjax calls `os.path` on a workdir."""

import atexit
import hashlib
import os
import shutil
import tempfile
import uuid

from etils import epath


def error_text(e: BaseException, *, last: bool = False) -> str:
  """The first (or last) line of `e`'s message; its type's name if it has none."""
  text = str(e).strip()
  return text.splitlines()[-1 if last else 0] if text else type(e).__name__


def error_line(e: BaseException, limit: int = 200) -> str:
  """`e` in one line for a message: 'Type: first line of its message' (cut at `limit`)."""
  return f"{type(e).__name__}: {error_text(e)[:limit]}" if str(e).strip() else type(e).__name__


def is_url(p) -> bool:
  return "://" in str(p)


def path(p) -> epath.Path:
  """`p` as an epath.Path: local paths made absolute, URLs kept as they are."""
  out = epath.Path(p)
  return out if is_url(p) else out.absolute()


_REACHED = set()  # (bucket, endpoint) pairs this process has checked: asked once each


def check_bucket(url: str, timeout: float = 10.0) -> None:
  """Raises a one-line ValueError within seconds if the bucket of a gs:// `url` cannot be
  reached or does not exist (storage clients would retry for minutes); each is asked once."""
  if not str(url).startswith("gs://"):
    return
  bucket = str(url)[len("gs://"):].split("/")[0]
  if not bucket:
    raise ValueError(f"{url} names no bucket; expected gs://BUCKET/PATH")
  key = (bucket, os.environ.get("STORAGE_EMULATOR_HOST"))
  if key in _REACHED:
    return
  from google.api_core import exceptions  # only for gs://: the import takes a second
  from google.cloud import storage
  try:
    storage.Client().get_bucket(bucket, timeout=timeout, retry=None)
  except exceptions.NotFound:
    raise ValueError(f"{url}: bucket gs://{bucket} does not exist") from None
  except exceptions.Forbidden:
    raise ValueError(f"{url}: no permission to use bucket gs://{bucket} (its IAM grants this "
                     f"account nothing)") from None
  except Exception as e:  # no credentials, no network, a timeout
    raise ValueError(f"{url}: bucket gs://{bucket} cannot be reached "
                     f"({error_line(e, 300)})") from None
  _REACHED.add(key)


def open_dir(p, what: str = "workdir") -> epath.Path:
  """Directory `p`, created if need be and proven writable, or a one-line ValueError."""
  check_bucket(str(p))
  directory = path(p)
  probe = directory / f".write_probe_{uuid.uuid4().hex}"
  for problem, act in (("cannot be created", lambda: directory.mkdir(parents=True, exist_ok=True)),
                       ("is not writable", lambda: (probe.write_text("ok"), probe.unlink()))):
    try:
      act()
    except Exception as e:  # OSError locally; the storage client's own errors for URLs
      raise ValueError(f"{what} {directory} {problem}: {error_text(e)}") from None
  return directory


def check_buckets(ps) -> None:
  """`check_bucket` for each of `ps` (each distinct bucket is asked once)."""
  for p in ps:
    check_bucket(str(p))


def glob(pattern) -> list[str]:
  """The files and directories `pattern` (local or a URL, wildcards after the bucket) matches,
  sorted; a pattern without wildcards matches itself if it exists."""
  import glob as globlib
  pattern = str(pattern)
  if not is_url(pattern):
    return sorted(globlib.glob(pattern))
  scheme, _, rest = pattern.partition("://")
  parts = rest.split("/")
  first = next((i for i, part in enumerate(parts) if globlib.has_magic(part)), None)
  if first is None:
    return [pattern] if epath.Path(pattern).exists() else []
  if first == 0:
    raise ValueError(f"{pattern}: a wildcard in the bucket name; give gs://BUCKET/PATTERN")
  if "**" in rest:  # epath refuses it: one listing request per directory
    raise ValueError(f"{pattern}: '**' is not supported on {scheme}://; use '*' per level")
  base = epath.Path(f"{scheme}://" + "/".join(parts[:first]))
  return sorted(str(p) for p in base.glob("/".join(parts[first:])))


def is_file(p) -> bool:
  """Whether `p` is a file; a gs:// bucket is checked first (one line in seconds, not retries)."""
  check_bucket(str(p))
  return path(p).is_file() if is_url(p) else os.path.isfile(p)


def is_dir(p) -> bool:
  check_bucket(str(p))
  return path(p).is_dir() if is_url(p) else os.path.isdir(p)


_COPIES = None  # this process's directory of local copies of URLs


def local_copy(p) -> str:
  """`p` itself if local, else a local copy of the object (one that mmap or a C library can
  read): downloaded once per process, again if the object changed; removed at exit."""
  if not is_url(p):
    return str(p)
  global _COPIES
  if _COPIES is None:
    _COPIES = tempfile.mkdtemp(prefix="llmjax-data-")
    atexit.register(shutil.rmtree, _COPIES, ignore_errors=True)
  remote = path(p)
  stat = remote.stat()
  key = hashlib.sha256(f"{p} {stat.length} {stat.mtime}".encode()).hexdigest()[:16]
  local = os.path.join(_COPIES, f"{key}-{remote.name}")
  if not os.path.exists(local):
    with remote.open("rb") as src, open(local + ".part", "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(local + ".part", local)
  return local
