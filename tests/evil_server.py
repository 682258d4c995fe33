"""A malicious cldcb server for tests: ``cldcb-server`` whose sessions lie in their texts.

Run instead of ``python -m cldcb.server.admin`` (same arguments). The hello is the
real one (the real server key, so clients pin and accept it); after it, every
request is answered with ``Error($CLDCB_EVIL_CODE, $CLDCB_EVIL_TEXT)`` (code
STORAGE by default). With ``CLDCB_EVIL_DISCONNECT=1`` the SSH connection is
dropped instead, as the client begins to log in, with ``$CLDCB_EVIL_TEXT`` as the
disconnect reason. A dishonest server controls exactly these texts, so this is
what it can show the operator. With ``CLDCB_EVIL_LISTING=loop`` it answers every
``ListRecognitions`` with the same page, whose cursor never moves forward.
"""

from __future__ import annotations

import os
from typing import Any

import asyncssh

from cldcb.core import wire
from cldcb.server import daemon, handler
from cldcb.server.admin import main

TEXT = os.environ["CLDCB_EVIL_TEXT"]
CODE = int(os.environ.get("CLDCB_EVIL_CODE", str(int(wire.ErrorCode.STORAGE))))
LISTING = os.environ.get("CLDCB_EVIL_LISTING", "")


async def _handle(self: handler.SessionHandler, msg: wire.Message) -> None:
    if isinstance(msg, wire.ListRecognitions) and LISTING == "loop":
        self.session.send(wire.Recognitions([b"entry"], "c2"))   # the same page forever
        return
    self.session.send(wire.Error(CODE, TEXT))


def _begin_auth(self: Any, username: str) -> bool:
    self._conn.disconnect(asyncssh.DISC_SERVICE_NOT_AVAILABLE, TEXT)
    return True


handler.SessionHandler._handle = _handle  # type: ignore[method-assign]
handler.SessionHandler._answer_on_hot_path = lambda self, msg: False  # type: ignore[method-assign]
if os.environ.get("CLDCB_EVIL_DISCONNECT") == "1":
    daemon._Server.begin_auth = _begin_auth  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
