"""A client's settings file (``clients/<client_id>/settings.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cldcb.errors import StoreError

SETTINGS = "settings.json"


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
        raise StoreError(f"{path} is unreadable or damaged ({exc}); set the client's "
                         "settings again with `cldcb-server add CLIENT_ID ...`") from None
