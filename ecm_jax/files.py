"""The one atomic write: readers see the old file (or folder) or the new one, never half of one.

Everything a run leaves on disk outside orbax's checkpoints (config.json, splits.json,
metrics.jsonl on resume, eval outputs, pictures, predicted masks, the preprocessing cache, the
synthetic demo set) is written through `atomic_path`.
"""

from collections.abc import Iterator
import contextlib
import json
import os
import pathlib
import shutil
from typing import Any
import uuid


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
