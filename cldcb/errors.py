"""The one exception tree of cldcb.

Every error a user can see derives from :class:`CldcbError`, and its message
says what happened and what to do about it. The command-line programs print
``error: <message>`` and exit non-zero; a traceback appears only with
``--debug``. Messages never contain secret material (keys, passphrases,
plaintext of the database).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit status of every cldcb program (the README's table lists them)."""

    OK = 0
    """All is well / the command did what was asked."""
    FAILURE = 1
    """The command failed (``error: …``), or ``status``/``verify`` found a problem not
    listed below (a backup that differs, a database older than its backup)."""
    USAGE = 2
    """A missing or malformed option or argument."""
    LAG = 3
    """``status``: a server is behind the database by more than ``--max-lag``."""
    OUTAGE = 4
    """``status``: a server cannot be reached or holds nothing for this node."""
    PLUGIN_DOWN = 5
    """``status``: lightningd runs but the cldcb plugin does not."""


class CldcbError(Exception):
    """Base of every cldcb error; ``str(err)`` is meant for the operator."""

    exit_code: int = ExitCode.FAILURE


class UsageError(CldcbError):
    """A missing or malformed command-line value; names the flag to give."""

    exit_code = ExitCode.USAGE


class KeyFormatError(CldcbError):
    """A client id, server id, node id, public key or key file is malformed."""


class KeyFileError(CldcbError):
    """A key file cannot be read or written (missing, exists, permissions)."""


class HsmSecretError(CldcbError):
    """The ``hsm_secret`` cannot give a node key."""


class PassphraseRequired(HsmSecretError):
    """The ``hsm_secret`` is encrypted or passphrase-protected and none was given."""


class WrongPassphrase(HsmSecretError):
    """The passphrase given does not open this ``hsm_secret``."""


class CorruptHsmSecret(HsmSecretError):
    """The ``hsm_secret`` file is damaged or in no format Core Lightning writes."""


class HsmdError(CldcbError):
    """An hsmd-like program (``--alt-hsmd``) failed or answered something unexpected."""


class DataVersionError(CldcbError, ValueError):
    """A data_version is out of range, or a tip cannot advance as asked
    (:mod:`cldcb.dataversion`)."""


class SealError(CldcbError):
    """A sealed record, snapshot chunk or envelope does not open (tampered or wrong key)."""


class ChainError(SealError):
    """The record chain is broken: a record was altered, reordered, dropped or moved.

    ``position`` is the index of the offending record in the stream as fetched
    and ``data_version`` its data_version, when known.
    """

    def __init__(self, message: str, *, position: int | None = None,
                 data_version: int | None = None) -> None:
        super().__init__(message)
        self.position = position
        self.data_version = data_version


class ProtocolError(CldcbError):
    """The peer sent bytes that are not a valid cldcb frame or message in this state."""


class AckMismatch(ProtocolError):
    """A server acknowledged something other than the request it answers (another
    data_version, kind or link; another snapshot id, data_version or chunk index): a
    protocol violation. The acknowledgement never counts and the connection is dropped."""


class ForgedAnswer(AckMismatch):
    """An acknowledgement without this session's MAC (:mod:`cldcb.answermac`): the holder
    of the server key did not make it (someone who holds only the SSH host key answers in
    its place, or the server is faulty). Never counted; the connection is dropped."""


class AuthError(CldcbError):
    """The hello failed: wrong server id, unknown client, bad signature."""


class RemoteError(CldcbError):
    """The server answered with an ``error`` message; ``code`` is its error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class TransportError(CldcbError):
    """A connection to a server could not be made or was lost."""


class StoreError(CldcbError):
    """The server's store cannot do what was asked (damaged file, disk full)."""


class Damage(StoreError):
    """No valid frame starts at ``offset`` of a store file: ``<reason> at offset <offset>``.

    Inside the store only (:mod:`cldcb.store.frames`): its callers turn it into a decision
    (cut a torn tail, skip a damaged snapshot) or into a :class:`StoreError` that says
    which file and what to do.
    """

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"{reason} at offset {offset}")
        self.offset = offset
        self.reason = reason


class Superseded(StoreError):
    """A newer session of this client took over as writer: this one may no longer write
    (the server answers ``SUPERSEDED`` and closes it)."""


class BadRequest(StoreError):
    """A request the store refuses as malformed (an unknown kind, a wrong size, a chunk out
    of order): the sending client's error, not damage; nothing was stored."""


class RecognitionKept(BadRequest):
    """An append-only client's recognition entry is never replaced: the new one was not
    stored, the one held stays (wire error code ``KEPT``)."""


class QuotaExceeded(StoreError):
    """The client's quota on this server would be exceeded; nothing was stored."""


class ReplayError(CldcbError):
    """Rebuilding a database from a snapshot and records failed."""


class RecoveryError(CldcbError):
    """Disaster recovery cannot go on (nothing found, refuses to overwrite, ...)."""


class PluginError(CldcbError):
    """The plugin cannot start or cannot keep its promise (configuration, outage)."""


class DatabaseBusy(PluginError):
    """The database is exclusively locked (lightningd's open transaction spilled SQLite's
    page cache), so no consistent copy can be read now: try again once lightningd has
    committed."""


class SnapshotAborted(PluginError):
    """A snapshot upload was stopped because its snapshot is no longer wanted."""


class MirrorUnusable(PluginError):
    """The local mirror cannot give the snapshot asked for: the database is copied
    instead."""


class MirrorDiscarded(PluginError):
    """The local mirror is wrong or cannot follow the changes: it is thrown away and built
    again from the next snapshot."""


class MirrorDiffers(MirrorDiscarded):
    """The local mirror and the live database differ at the same data_version: the mirror
    is thrown away."""


class NodeConfigError(CldcbError):
    """A node's config file cannot be read or written: check the path and its owner."""


class RpcTransportError(CldcbError):
    """The RPC connection to lightningd failed, timed out or carried no JSON-RPC."""


class LightningdNotRunning(RpcTransportError):
    """Nothing answers on lightningd's RPC socket: lightningd is not running."""


class RpcError(CldcbError):
    """lightningd refused a call (a JSON-RPC error): ``lightningd refused `METHOD` (code
    N): MESSAGE``."""

    def __init__(self, method: str, code: int | None, message: str,
                 data: object = None) -> None:
        code_text = f" (code {code})" if code is not None else ""
        super().__init__(f"lightningd refused `{method}`{code_text}: {message}")
        self.method = method
        self.code = code
        self.rpc_message = message
        self.data = data


class WalletNotSupported(UsageError):
    """lightningd's ``wallet`` option names a database cldcb cannot back up (PostgreSQL,
    or no file)."""


class VerifyError(CldcbError):
    """``cldcb-client verify`` cannot compare the backup with the live database (the
    database is missing, locked for too long, or not lightningd's)."""


class StatusError(CldcbError):
    """``cldcb-client status`` cannot read the live database's data_version."""


class PrometheusError(CldcbError):
    """The Prometheus text file cannot be written: give ``--prometheus`` a writable
    path."""
