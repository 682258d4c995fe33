"""Client and server key files, and passphrase files (DESIGN section 1).

A key file is text, mode 0600, two lines::

    # cid = c3df949fa268776a789f321051211a9183fb9c2891b8dc2742cfc9107ec7f9d23f
    # cpk = <64 hex digits of the private key>

The server's is the same with ``sid`` (a server id, ``52…``/``53…``) and
``spk``. Parsing checks that the private key gives the id written beside it.
Key files are created atomically, never overwrite anything, and messages never
show the private key. As OpenSSH does with private keys, a key file that
other users may read or write (any group or other permission bit) is
refused, with the ``chmod 600`` that fixes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cldcb.core.ids import (
    check_privkey,
    client_id_from_pubkey,
    parse_client_id,
    parse_server_id,
    pubkey_of,
    server_id_from_pubkey,
)
from cldcb.errors import KeyFileError, KeyFormatError
from cldcb.node.durable import fsync_dir

KEY_FILE_MODE = 0o600


@dataclass(frozen=True)
class _Kind:
    what: str  # "client" / "server"
    id_name: str  # "cid" / "sid"
    key_name: str  # "cpk" / "spk"


CLIENT = _Kind("client", "cid", "cpk")
SERVER = _Kind("server", "sid", "spk")
_KINDS = {"client": CLIENT, "server": SERVER}


def _id_of(kind: _Kind, privkey32: bytes) -> str:
    pub = pubkey_of(privkey32)
    return client_id_from_pubkey(pub) if kind is CLIENT else server_id_from_pubkey(pub)


def format_key_file(privkey32: bytes, kind: str = "client") -> str:
    """The text of a ``kind`` ("client" or "server") key file for ``privkey32``."""
    k = _KINDS[kind]
    return (f"# {k.id_name} = {_id_of(k, privkey32)}\n"
            f"# {k.key_name} = {check_privkey(privkey32).hex()}\n")


def _fields(text: str, source: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        body = stripped[1:].strip() if stripped.startswith("#") else ""
        name, sep, value = body.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise KeyFormatError(f"{source}: line {lineno} is not '# name = value': "
                                 "this is not a cldcb key file, or it is damaged")
        if name in fields:
            raise KeyFormatError(f"{source}: '{name}' appears twice: the file is damaged")
        fields[name] = value
    return fields


def parse_key_file(text: str, kind: str = "client", source: str = "key file") -> tuple[bytes, str]:
    """``(privkey32, id)`` from the text of a ``kind`` key file.

    ``source`` names the file in error messages.
    """
    k = _KINDS[kind]
    fields = _fields(text, source)
    other = SERVER if k is CLIENT else CLIENT
    if k.id_name not in fields or k.key_name not in fields:
        if other.id_name in fields or other.key_name in fields:
            raise KeyFormatError(f"{source} is a {other.what} key file, not a {k.what} "
                                 f"key file: give the {k.what}'s key file")
        missing = k.id_name if k.id_name not in fields else k.key_name
        raise KeyFormatError(f"{source} has no '# {missing} = …' line: it is not a "
                             f"{k.what} key file, or it is damaged")
    key_hex = fields[k.key_name]
    if len(key_hex) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in key_hex):
        raise KeyFormatError(f"{source}: {k.key_name} must be 64 hex digits: "
                             "the file is damaged")
    privkey = check_privkey(bytes.fromhex(key_hex))
    parse = parse_client_id if k is CLIENT else parse_server_id
    try:
        written_pub = parse(fields[k.id_name])
    except KeyFormatError as exc:
        raise KeyFormatError(f"{source}: {exc}") from None
    if written_pub != pubkey_of(privkey):
        raise KeyFormatError(f"{source}: its {k.key_name} does not give the "
                             f"{k.id_name} written beside it: the file is damaged")
    return privkey, _id_of(k, privkey)


def write_key_file(path: Path | str, privkey32: bytes, kind: str = "client") -> str:
    """Create ``path`` as a ``kind`` key file (mode 0600) and return its id.

    The file appears complete or not at all, and an existing file is never
    replaced: that is a :class:`KeyFileError` telling to choose another path.
    """
    path = Path(path)
    data = format_key_file(privkey32, kind).encode("ascii")
    _k = _KINDS[kind]
    if path.exists() or path.is_symlink():
        raise _exists_error(path, _k)
    directory = path.parent
    if not directory.is_dir():
        raise KeyFileError(f"cannot create {path}: folder {directory} does not exist; "
                           "create it first or choose another path")
    tmp = directory / f".{path.name}.tmp-{secrets.token_hex(6)}"
    try:
        _write_new(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _exists_error(path, _k) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                 errno.EMLINK):
                raise
            # A filesystem without hard links: O_EXCL straight on the target.
            try:
                _write_new(path, data)
            except FileExistsError:
                raise _exists_error(path, _k) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}; "
                           "check the folder's permissions or choose another path") from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    _fsync_dir(directory)
    return _id_of(_k, privkey32)


def _exists_error(path: Path, kind: _Kind) -> KeyFileError:
    return KeyFileError(f"{path} already exists; it was not changed (a key file is "
                        f"never overwritten): choose another path for the new {kind.what} key")


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 KEY_FILE_MODE)
    try:
        os.fchmod(fd, KEY_FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: the key file itself is fsynced
        fsync_dir(directory)


def _read_text(path: Path | str, what: str) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path} is a folder, not a file: check the path") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}; "
                           "check its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{what} {path} is not UTF-8 text: check that it is the "
                           "right file") from None


def _private(path: Path | str, what: str) -> None:
    """Refuse a key file that other users may read or write (as OpenSSH does)."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"{what} {path} is readable by other users (mode {mode:04o}); "
                           f"it holds a secret key, so it is not used: run `chmod 600 {path}` "
                           "and try again")


def read_client_key(path: Path | str) -> tuple[bytes, str]:
    """``(privkey32, client_id)`` from a client key file (refused if not private)."""
    found = parse_key_file(_read_text(path, "client key file"), "client", str(path))
    _private(path, "client key file")
    return found


def read_server_key(path: Path | str) -> tuple[bytes, str]:
    """``(privkey32, server_id)`` from a server key file (refused if not private)."""
    found = parse_key_file(_read_text(path, "server key file"), "server", str(path))
    _private(path, "server key file")
    return found


def read_passphrase_file(path: Path | str) -> str:
    """The passphrase in ``path``: its text less one trailing ``\\n`` or ``\\r\\n``."""
    text = _read_text(path, "passphrase file")
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise KeyFileError(f"passphrase file {path} is empty: write the passphrase in it")
    return text
