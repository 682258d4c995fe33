"""JSON-RPC 2.0 framing between lightningd and a plugin (stdin/stdout).

lightningd writes one JSON object after another, each followed by a blank
line (``\\n\\n``); a plugin answers the same way. Objects are parsed
incrementally with :meth:`json.JSONDecoder.raw_decode` over a buffer rather
than by lines, since SQL text inside a ``db_write`` call can be long and a
read can end anywhere (even inside a UTF-8 sequence).

:class:`MessageDecoder` is pure (bytes in, objects out); :class:`StdoutWriter`
writes whole messages to a file descriptor. The simulated lightningd of the
tests uses the same two classes from the other side.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any

from cldcb.errors import ProtocolError

MAX_MESSAGE = 256 * 1024 * 1024
"""Largest JSON message accepted (a buffer that grows past it is a protocol error)."""

_WS = " \t\r\n"
_decoder = json.JSONDecoder()


class MessageDecoder:
    """Turns a byte stream of JSON objects (separated by whitespace) into dicts.

    :meth:`feed` returns every complete object received so far. An object is
    only parsed once a ``}`` arrived after the previous attempt, so a long
    message that trickles in is not re-parsed for every read. Anything that
    is not a JSON object at the top level is a :class:`ProtocolError`.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._buf = ""
        self._open = False      # a message has started and is not complete yet
        self._max = max_message

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        try:
            text = self._utf8.decode(data)
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"the JSON-RPC stream is not UTF-8: {exc}") from None
        if not text:
            return []
        self._buf += text
        if "}" not in text:
            if not self._open:
                head = text.lstrip(_WS)[:1]
                if head and head != "{":
                    raise ProtocolError(f"expected a JSON object, got {text.lstrip()[:20]!r}")
                self._open = bool(head)
            if len(self._buf) > self._max:
                raise ProtocolError(f"a JSON-RPC message is larger than {self._max} bytes")
            return []
        return self._drain()

    def _drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        buf = self._buf
        pos = 0
        n = len(buf)
        while True:
            while pos < n and buf[pos] in _WS:
                pos += 1
            if pos >= n:
                break
            if buf[pos] != "{":
                raise ProtocolError(f"expected a JSON object, got {buf[pos:pos + 20]!r}")
            try:
                obj, end = _decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                break  # incomplete: wait for more (a malformed one fails at the limit)
            if not isinstance(obj, dict):  # pragma: no cover - starts with "{"
                raise ProtocolError("a JSON-RPC message must be an object")
            out.append(obj)
            pos = end
        self._buf = buf[pos:]
        self._open = pos < n
        if len(self._buf) > self._max:
            raise ProtocolError(f"a JSON-RPC message is larger than {self._max} bytes "
                                "or is malformed")
        return out

    @property
    def pending(self) -> int:
        """Characters received that do not make a whole object yet (whitespace excluded)."""
        return len(self._buf.strip(_WS))


def encode(message: dict[str, Any]) -> bytes:
    """One message as bytes, followed by the blank line that separates messages."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8") \
        + b"\n\n"


def encode_continue(request_id: Any) -> bytes:
    """``encode(response(request_id, {"result": "continue"}))``, the hook's usual answer,
    without building and encoding the whole object each time."""
    return b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() \
        + b',"result":{"result":"continue"}}\n\n'


def response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def request(request_id: Any, method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


class StdoutWriter:
    """Writes whole messages to a file descriptor (blocking; lightningd always reads).

    A write to a reader that went away raises :class:`BrokenPipeError`, which
    the caller takes as "lightningd is gone".
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, message: dict[str, Any]) -> None:
        self.write(encode(message))

    def write(self, encoded: bytes) -> None:
        """Write one message already encoded (:func:`encode`, :func:`encode_continue`)."""
        written = os.write(self._fd, encoded)
        if written == len(encoded):
            return                        # the usual case: all of it at once
        data = memoryview(encoded)[written:]
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
