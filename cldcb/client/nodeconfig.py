"""The node's files that cldcb-client writes: the config line and where things are.

- :func:`add_important_plugin` / :func:`remove_important_plugin`: the
  ``important-plugin=<wrapper>`` line in ``<lightning-dir>/<network>/config``,
  added exactly once (a line naming the same file in the top-level
  ``<lightning-dir>/config`` counts too), removed from both. The file is
  replaced atomically, keeping its mode and owner; a new one gets the owner
  of its folder. Installation and recovery both use these.
- :func:`wallet_from_config_files`: the ``wallet=`` option as written in the
  config files, for when lightningd is not running to tell it.

The config file grammar is lightningd's: ``name=value`` or ``name`` per line,
``#`` comments; ``include`` lines are not followed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cldcb.durable import replace_file
from cldcb.errors import NodeConfigError
from cldcb.plugin.wrapper import WRAPPER_NAME

CONFIG_NAME = "config"
IMPORTANT_PLUGIN = "important-plugin"


@dataclass(frozen=True)
class NodePaths:
    """Where a node's files are: ``<lightning-dir>/<network>/…``."""

    lightning_dir: Path
    network: str = "bitcoin"

    @property
    def network_dir(self) -> Path:
        return self.lightning_dir.absolute() / self.network

    @property
    def wrapper(self) -> Path:
        return self.network_dir / WRAPPER_NAME

    @property
    def config(self) -> Path:
        return self.network_dir / CONFIG_NAME

    @property
    def top_config(self) -> Path:
        return self.lightning_dir.absolute() / CONFIG_NAME

    @property
    def hsm_secret(self) -> Path:
        return self.network_dir / "hsm_secret"

    @property
    def status_file(self) -> Path:
        return self.network_dir / "cldcb-status.json"


def _option(line: str) -> tuple[str, str] | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    name, _, value = text.partition("=")
    return name.strip(), value.strip()


def _same_file(value: str, target: Path, base: Path) -> bool:
    p = Path(os.path.expanduser(value))
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(p) == os.path.normpath(target)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise NodeConfigError(f"cannot read lightningd's config {path}: {reason}; check "
                              "its permissions (run as the node's user or root)") from None


def _lines_naming(text: str | None, target: Path, base: Path,
                  names: tuple[str, ...]) -> list[int]:
    found = []
    for i, line in enumerate((text or "").splitlines()):
        opt = _option(line)
        if opt and opt[0] in names and _same_file(opt[1], target, base):
            found.append(i)
    return found


def has_important_plugin(paths: NodePaths, wrapper: Path | None = None) -> bool:
    """True if either config file has ``important-plugin=<wrapper>``."""
    wrapper = wrapper or paths.wrapper
    return any(_lines_naming(_read(cfg), wrapper, paths.network_dir, (IMPORTANT_PLUGIN,))
               for cfg in (paths.config, paths.top_config))


def add_important_plugin(paths: NodePaths, wrapper: Path | None = None) -> bool:
    """Add ``important-plugin=<wrapper>`` to the network's config, once.

    Returns True if the file changed, False if such a line was there already
    (in the network's or the top-level config).
    """
    wrapper = wrapper or paths.wrapper
    if has_important_plugin(paths, wrapper):
        return False
    target = _real(paths.config)
    text = _read(target) or ""
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"{IMPORTANT_PLUGIN}={wrapper}\n"
    _replace(target, text)
    return True


def remove_important_plugin(paths: NodePaths, wrapper: Path | None = None) -> list[Path]:
    """Remove every ``important-plugin=``/``plugin=`` line naming ``wrapper``
    from both config files; return the files that changed."""
    wrapper = wrapper or paths.wrapper
    changed = []
    for cfg in (paths.config, paths.top_config):
        target = _real(cfg)
        text = _read(target)
        drop = set(_lines_naming(text, wrapper, paths.network_dir,
                                 (IMPORTANT_PLUGIN, "plugin")))
        if text is None or not drop:
            continue
        kept = [line for i, line in enumerate(text.splitlines(keepends=True)) if i not in drop]
        _replace(target, "".join(kept))
        changed.append(cfg)
    return changed


def wallet_from_config_files(paths: NodePaths) -> str | None:
    """The last ``wallet=`` value in the config files (the network's wins), or None."""
    value = None
    for cfg in (paths.top_config, paths.config):
        for line in (_read(cfg) or "").splitlines():
            opt = _option(line)
            if opt and opt[0] == "wallet":
                value = opt[1]
    return value


def _real(path: Path) -> Path:
    """The file a config path names (a symlinked config is edited in place)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _replace(path: Path, text: str) -> None:
    folder = path.parent
    try:
        st = path.stat()
        mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    except FileNotFoundError:
        dst = folder.stat()
        mode, uid, gid = 0o644, dst.st_uid, dst.st_gid
    except OSError as exc:
        raise NodeConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        replace_file(path, text, mode=mode, owner=(uid, gid))
    except OSError as exc:
        raise NodeConfigError(f"cannot write {path}: {exc.strerror or exc}; run as the "
                              "node's user or root") from None
