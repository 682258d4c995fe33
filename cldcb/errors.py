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
