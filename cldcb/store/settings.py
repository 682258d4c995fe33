"""A client's settings file (``clients/<client_id>/settings.json``) and its history
(``clients/<client_id>/settings.history``): see :mod:`cldcb.store`."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cldcb.errors import StoreError
from cldcb.store.fs import FileLayer, write_all

SETTINGS = "settings.json"
HISTORY = "settings.history"


@dataclass(frozen=True)
class Settings:
    quota: int | None = None
    append_only: bool = False
    generations: int = 2

    def __post_init__(self) -> None:
        if self.quota is not None and (not isinstance(self.quota, int) or self.quota < 0):
            raise StoreError(f"quota must be a number of bytes, not {self.quota!r}")
        if not isinstance(self.generations, int) or self.generations < 1:
            raise StoreError(f"generations must be at least 1, not {self.generations!r}")

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"


def read_settings(folder: Path) -> Settings | None:
    """The settings in ``folder``, None if the client is not registered there."""
    path = folder / SETTINGS
    try:
        raw = json.loads(path.read_bytes())
        return Settings(quota=raw.get("quota"), append_only=bool(raw.get("append_only")),
                        generations=int(raw.get("generations", 2)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise StoreError(f"{path} is unreadable or damaged ({exc}); set all the client's "
                         "settings again with `cldcb-server set CLIENT_ID --quota SIZE "
                         "--generations N --append-only|--no-append-only`") from None


def append_history(fs: FileLayer, folder: Path, by: str, old: Settings | None,
                   new: Settings) -> None:
    """Append one line (JSON: time, command, old and new settings) to the client's
    settings history, durably, before the change is made. Raises OSError."""
    path = folder / HISTORY
    line = json.dumps({"time_ms": int(time.time() * 1000), "by": by,
                       "old": asdict(old) if old else None, "new": asdict(new)},
                      sort_keys=True).encode() + b"\n"
    created = not fs.exists(path)
    fd = fs.open_write(path, create=True)
    try:
        write_all(fs, fd, line, 0 if created else fs.size(path), durable=True)
    finally:
        fs.close(fd)
    if created:
        fs.fsync_dir(folder)
