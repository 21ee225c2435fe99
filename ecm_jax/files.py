"""The one atomic write: readers see the old file (or folder) or the new one, never half of one.

Everything a run leaves on disk outside orbax's checkpoints (config.json, splits.json,
metrics.jsonl on resume, eval outputs, pictures, predicted masks, the preprocessing cache, the
synthetic demo set) is written through `atomic_path`. `check_writable` and `check_free_space` test
a folder before a command starts work there, so a read-only or full disk is reported at once.
"""

from collections.abc import Iterator
import contextlib
import errno
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any
import uuid

from ecm_jax.errors import StorageError

# Write failures a user fixes on the machine (space, quota, permissions), not bugs.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM)


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path` (same folder, same suffixes, so writers that go by the
  file name still work); write the file or folder there. When the block completes it is renamed
  onto `path` (`os.replace`: a file or an empty folder there is replaced); if the block or the
  rename fails, the temporary is removed and the error raised, `path` untouched."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f'.tmp-{uuid.uuid4().hex[:8]}-{path.name}')
  try:
    yield temporary
    os.replace(temporary, path)
  except BaseException:
    _remove(temporary)
    raise


def write_text(path, text: str) -> None:
  with atomic_path(path) as temporary:
    temporary.write_text(text)


def write_json(path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def check_writable(folder, what: str) -> pathlib.Path:
  """Creates `folder` (and parents) if needed and writes and removes a file there; raises
  StorageError naming `what` (e.g. '--workdir') and the folder if it cannot. Returns the folder."""
  folder = pathlib.Path(folder)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder, prefix='.write-test-'):
      pass
  except OSError as e:
    raise StorageError(f'{what} {folder} is not writable ({e.strerror or e}): choose a '
                       f'writable folder') from e
  return folder


def check_free_space(folder, needed_bytes: int, what: str) -> None:
  """Raises StorageError when the file system of `folder` has less than `needed_bytes` free."""
  free = shutil.disk_usage(folder).free
  if free < needed_bytes:
    raise StorageError(f'{what} {folder}: {free / 2**20:.1f} MiB free, but about '
                       f'{needed_bytes / 2**20:.1f} MiB are needed: free space there or choose '
                       f'another folder')
