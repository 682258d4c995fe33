"""The server's data directory: registered clients and recognition entries.

The rules are in the docstring of :mod:`cldcb.store`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from cldcb.core.ids import parse_client_id
from cldcb.core.recognition import ENTRY_LEN, check_put
from cldcb.core.wire import MAX_LIST, MAX_RECOGNITION
from cldcb.errors import BadRequest, CldcbError, RecognitionKept, SealError, StoreError
from cldcb.store.client import ClientStore
from cldcb.store.crashpoints import crashpoint
from cldcb.store.fs import FileLayer, OsFileLayer, ensure_dir, io_error, replace_file
from cldcb.store.locks import locked, settings_change
from cldcb.store.settings import SETTINGS, Settings, append_history, read_settings

log = logging.getLogger("cldcb.store")

SEGMENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ClientInfo:
    """One registered client, as ``cldcb-server list`` shows it."""

    client_id: str
    quota: int | None
    append_only: bool
    generations: int
    bytes_used: int
    newest_data_version: int | None
    last_seen_ms: int | None


def check_client_id(client_id: str) -> str:
    """The client id in lower case; KeyFormatError if it is not one (it names folders)."""
    parse_client_id(client_id)
    return client_id.lower()


class Store:
    """A server's data directory. Thread-safe for calls on different clients; calls
    on one client must be serialized by the caller (one lock per client)."""

    def __init__(self, data_dir: Path, fs: FileLayer, segment_bytes: int) -> None:
        self.data_dir = data_dir
        self.fs = fs
        self.segment_bytes = segment_bytes
        self.clients_dir = data_dir / "clients"
        self.recognitions_dir = data_dir / "recognitions"
        self.removed_dir = data_dir / "removed"
        self._clients: dict[str, ClientStore] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, data_dir: Path, *, fs: FileLayer | None = None,
             segment_bytes: int = SEGMENT_BYTES) -> Store:
        """Open the data directory (it must exist: ``cldcb-server init`` makes it)."""
        data_dir = Path(data_dir)
        fs = fs or OsFileLayer()
        if not data_dir.is_dir():
            raise StoreError(f"the data directory {data_dir} does not exist; create it with "
                             "`cldcb-server init` (or give --data-dir / CLDCB_SERVER_DIR)")
        store = cls(data_dir, fs, segment_bytes)
        try:
            for d in (store.clients_dir, store.recognitions_dir, store.removed_dir):
                ensure_dir(fs, d, "store")
        except OSError as exc:
            raise io_error(exc, f"preparing the data directory {data_dir}") from None
        return store

    def _folder(self, client_id: str) -> Path:
        return self.clients_dir / client_id

    # -- registration ------------------------------------------------------------------
    def is_registered(self, client_id: str) -> bool:
        try:
            cid = check_client_id(client_id)
        except CldcbError:
            return False
        return self.fs.exists(self._folder(cid) / SETTINGS)

    def add_client(self, client_id: str, *, quota: int | None = None,
                   append_only: bool = False, generations: int = 2) -> ClientInfo:
        """Register a client with these settings; an already registered client is left
        as it is (see :meth:`register`). ``quota`` None or 0 means no quota."""
        self.register(client_id, Settings(quota=quota or None, append_only=append_only,
                                          generations=generations))
        return self.info(client_id)

    def register(self, client_id: str, settings: Settings) -> bool:
        """Register a client with ``settings``: True if it was new. A client already
        registered keeps its settings, whatever ``settings`` says (only
        :meth:`change_settings` changes them)."""
        cid = check_client_id(client_id)
        folder = self._folder(cid)
        try:
            ensure_dir(self.fs, folder, "client")
            with settings_change(self.data_dir, cid):
                if self.fs.exists(folder / SETTINGS):
                    return False
                append_history(self.fs, folder, "add", None, settings)
                replace_file(self.fs, folder / SETTINGS, settings.encode(), "settings")
        except OSError as exc:
            raise io_error(exc, f"registering client {cid}") from None
        log.info("client %s registered: %s", cid, settings)
        return True

    def change_settings(self, client_id: str, *, quota: int | None = None,
                        append_only: bool | None = None, generations: int | None = None,
                        by: str = "set") -> tuple[Settings, Settings]:
        """Change the settings given (None: unchanged; ``quota`` 0 lifts the quota) of a
        registered client; ``(old, new)``. A change is appended to its settings history;
        lifting append-only is also a warning on the ``cldcb.store`` logger."""
        cid = check_client_id(client_id)
        folder = self._folder(cid)
        try:
            with settings_change(self.data_dir, cid):
                try:
                    old = read_settings(folder)
                    damaged = False
                except StoreError:
                    if None in (quota, append_only, generations):
                        raise       # damaged: only a full set of settings replaces it
                    old, damaged = Settings(), True
                if old is None:
                    raise StoreError(f"client {cid} is not registered on this server; "
                                     f"register it with `cldcb-server add {cid}`")
                new = replace(old, quota=old.quota if quota is None else quota or None,
                              append_only=old.append_only if append_only is None
                              else append_only,
                              generations=old.generations if generations is None
                              else generations)
                if new != old or damaged:
                    append_history(self.fs, folder, by, None if damaged else old, new)
                    replace_file(self.fs, folder / SETTINGS, new.encode(), "settings")
        except OSError as exc:
            raise io_error(exc, f"changing the settings of client {cid}") from None
        if new != old:
            log.info("client %s settings changed by %s: %s -> %s", cid, by, old, new)
        if old.append_only and not new.append_only:
            log.warning("client %s: append-only lifted by %s; what it sends can now delete "
                        "its history", cid, by)
        return old, new

    def remove_client(self, client_id: str) -> None:
        """Unregister a client. Nothing is deleted: its folder (and recognition entry)
        move to ``removed/<client_id>.<n>``, where the operator can inspect, restore
        (move it back) or delete it. A backup tool never deletes backups on a typo."""
        cid = check_client_id(client_id)
        folder = self._folder(cid)
        if not self.fs.exists(folder / SETTINGS):
            raise StoreError(f"client {cid} is not registered on this server "
                             "(see `cldcb-server list`)")
        with self._lock:
            cs = self._clients.pop(cid, None)
        if cs is not None:
            cs.close()
        n = 1
        while self.fs.exists(self.removed_dir / f"{cid}.{n}"):
            n += 1
        dest = self.removed_dir / f"{cid}.{n}"
        entry = self.recognitions_dir / f"{cid}.entry"
        try:
            crashpoint("remove.before_rename")
            with settings_change(self.data_dir, cid):
                self.fs.rename(folder, dest)
            crashpoint("remove.after_rename")
            self.fs.fsync_dir(self.clients_dir)
            self.fs.fsync_dir(self.removed_dir)
            crashpoint("remove.after_fsync_dirs")
            if self.fs.exists(entry):
                self.fs.rename(entry, dest / "recognition.entry")
                crashpoint("remove.after_move_recognition")
                self.fs.fsync_dir(self.recognitions_dir)
                self.fs.fsync_dir(dest)
        except OSError as exc:
            raise io_error(exc, f"removing client {cid}") from None
        log.info("client %s removed; its data is kept in %s", cid, dest)

    def info(self, client_id: str) -> ClientInfo:
        """A registered client, as ``cldcb-server list`` shows it (read-only)."""
        return self._info(check_client_id(client_id))

    def _info(self, cid: str) -> ClientInfo:
        with self._lock:
            cs = self._clients.get(cid)
        opened_here = cs is not None and not cs.closed
        if not opened_here:
            # read-only: a live daemon in another process may be writing this client
            cs = ClientStore(self.fs, self._folder(cid), cid,
                             segment_bytes=self.segment_bytes, readonly=True)
        assert cs is not None
        st = cs.settings
        info = ClientInfo(cid, st.quota, st.append_only, st.generations, cs.bytes_used,
                          cs.tip.data_version if cs.tip else None, cs.last_seen_ms)
        if not opened_here:
            cs.close()
        return info

    def list_clients(self) -> list[ClientInfo]:
        """Every registered client. Reads only: repairs nothing (a daemon may be writing)."""
        out: list[ClientInfo] = []
        try:
            names = sorted(self.fs.listdir(self.clients_dir))
        except FileNotFoundError:
            return out
        for name in names:
            if not self.is_registered(name):
                continue
            try:
                out.append(self._info(name))
            except StoreError as exc:
                log.warning("client %s: %s", name, exc)
                st = read_settings(self._folder(name)) or Settings()
                out.append(ClientInfo(name, st.quota, st.append_only, st.generations, 0,
                                      None, None))
        return out

    # -- recognition entries -----------------------------------------------------------
    def put_recognition(self, client_id: str, entry: bytes) -> None:
        """Store the client's recognition entry durably, after checking it
        (:func:`cldcb.core.recognition.check_put`: the current format and length, and the
        client it names is this one; else BadRequest). It replaces the client's
        previous entry, except under append-only: there an entry once held is never
        replaced (the same bytes again are accepted, other bytes are refused with
        RecognitionKept). A refused entry leaves the previous one as it was."""
        cid = check_client_id(client_id)
        if not self.is_registered(cid):
            raise StoreError(f"client {cid} is not registered on this server; register it "
                             f"with `cldcb-server add {cid}`")
        if not entry or len(entry) > MAX_RECOGNITION:
            raise StoreError(f"a recognition entry must be at most {MAX_RECOGNITION} bytes "
                             f"and not empty (a real one is {ENTRY_LEN}), not {len(entry)} "
                             "bytes: nothing was stored; is the client program up to date?")
        try:
            check_put(bytes(entry), parse_client_id(cid))
        except SealError as exc:
            raise BadRequest(f"{exc}: nothing was stored") from None
        path = self.recognitions_dir / f"{cid}.entry"
        try:
            with locked(self.data_dir, cid):
                if self._append_only(cid):
                    held = self._held_entry(path)
                    if held == entry:
                        return
                    if held is not None:
                        raise RecognitionKept(
                            f"client {cid} is append-only on this server: the recognition "
                            "entry it holds is never replaced, so this one was not stored "
                            "(to replace it, the server's operator must first lift "
                            f"append-only: `cldcb-server set {cid} --no-append-only`)")
                replace_file(self.fs, path, bytes(entry), "recognition")
        except OSError as exc:
            raise io_error(exc, f"storing the recognition entry of client {cid}") from None

    def _append_only(self, cid: str) -> bool:
        settings = read_settings(self._folder(cid))
        return settings is not None and settings.append_only

    def _held_entry(self, path: Path) -> bytes | None:
        try:
            with self.fs.open_read(path) as f:
                return f.read(MAX_RECOGNITION + 1)
        except FileNotFoundError:
            return None

    def recognition_page(self, after: str, max_count: int) -> tuple[list[bytes], str]:
        """Up to ``max_count`` (at least 1) entries of registered clients whose client id
        sorts after ``after`` ("": from the first), in client id order, and the cursor to
        go on from: the last client id of the page, or "" when no entry follows. A file
        larger than MAX_RECOGNITION (stored by an older version) is skipped, with a
        warning."""
        try:
            names = sorted(self.fs.listdir(self.recognitions_dir))
        except FileNotFoundError:
            return [], ""
        out: list[bytes] = []
        for name in names:
            cid, dot, ext = name.partition(".")
            if cid <= after or not dot or ext != "entry" or not self.is_registered(cid):
                continue
            if len(out) >= max(1, max_count):
                return out, after
            try:
                with self.fs.open_read(self.recognitions_dir / name) as f:
                    entry = f.read(MAX_RECOGNITION + 1)
            except FileNotFoundError:
                continue
            after = cid
            if len(entry) > MAX_RECOGNITION:
                log.warning("the recognition entry of client %s is larger than %d bytes: "
                            "not listed (ask its operator to run installplugin again)",
                            cid, MAX_RECOGNITION)
                continue
            out.append(entry)
        return out, ""

    def list_recognitions(self) -> list[bytes]:
        """Every listed entry (all pages of :meth:`recognition_page`)."""
        out: list[bytes] = []
        after = ""
        while True:
            entries, after = self.recognition_page(after, MAX_LIST)
            out += entries
            if not after:
                return out

    # -- client stores -------------------------------------------------------------------
    def client(self, client_id: str) -> ClientStore:
        """The client's store (one instance per client per Store); opening it repairs a
        torn tail and deletes abandoned uploads."""
        with self._lock:
            cs = self._clients.get(client_id)
            if cs is not None and not cs.closed:
                return cs  # the hot path: no id parsing, no stat
        cid = check_client_id(client_id)
        with self._lock:
            cs = self._clients.get(cid)
            if cs is None or cs.closed:
                if not self.fs.exists(self._folder(cid) / SETTINGS):
                    raise StoreError(f"client {cid} is not registered on this server; "
                                     f"register it with `cldcb-server add {cid}`")
                cs = ClientStore(self.fs, self._folder(cid), cid,
                                 segment_bytes=self.segment_bytes)
                self._clients[cid] = cs
            return cs

    def prune(self, client_id: str, generations: int | None = None) -> int:
        """Server-side retention, also for append-only clients: keep ``generations``
        (default: the client's setting) newest snapshots and the records from the oldest
        kept one on. Bytes freed."""
        cs = self.client(client_id)
        try:
            return cs.prune(generations)
        except OSError as exc:
            raise io_error(exc, f"pruning client {client_id}") from None

    def close(self) -> None:
        with self._lock:
            stores, self._clients = list(self._clients.values()), {}
        for cs in stores:
            cs.close()
