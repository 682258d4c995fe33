"""One grammar for a server address: what ``--server`` accepts (and the connection dials)
is exactly what the wrapper's ``server =`` line accepts, so an install never writes a
wrapper the plugin then refuses, and the plugin never reads one the client would not."""

from __future__ import annotations

import pytest

from cldcb.connection import ServerAddress
from cldcb.errors import CldcbError, UsageError
from cldcb.ids import (
    client_id_from_pubkey,
    new_privkey,
    node_id_from_pubkey,
    pubkey_of,
    server_id_from_pubkey,
)
from cldcb.plugin.wrapper import ServerEntry, WrapperConfig, format_wrapper, parse

CLIENT = new_privkey()
SERVER = server_id_from_pubkey(pubkey_of(new_privkey()))
HOSTKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

ADDRESSES = [
    "203.0.113.5:29735", "backup.example:1", "[::1]:7", "[2001:db8::5]:65535",
    "ssh://backup.example", "ssh://cldcb@backup.example", "ssh://cldcb@backup.example:22",
    "ssh://cldcb@backup.example:2222/", "ssh://[::1]:22", "ssh://u-1.x_y@h",
    "backup.example", "host:0", "host:65536", "host:99999", "host:0000022", ":22", "[::1]",
    "ssh://@h", "ssh://a@b@h:22", "ssh://u/x@h", "ssh://u x@h", "ssh://h:0", "ssh://h:70000",
    "ssh://h:00022", "ssh://", "ssh://h/path", "a b:1", "host:22/", "user@host:22",
    "http://host:22", "ssh://h:x",
]


def _by_connection(address: str) -> ServerAddress | None:
    try:
        return ServerAddress.parse(address)
    except UsageError:
        return None


def _by_wrapper(address: str) -> ServerEntry | None:
    key = HOSTKEY if address.startswith("ssh://") else None
    cfg = WrapperConfig(client_id_from_pubkey(pubkey_of(CLIENT)), CLIENT,
                        node_id_from_pubkey(pubkey_of(new_privkey())),
                        (ServerEntry(address, SERVER, key),), plugin_path="/x/cldcb-plugin")
    try:
        return parse(format_wrapper(cfg)).servers[0]
    except CldcbError:
        return None


@pytest.mark.parametrize("address", ADDRESSES)
def test_the_wrapper_and_the_connection_read_an_address_alike(address: str) -> None:
    dialled = _by_connection(address)
    written = _by_wrapper(address)
    assert (dialled is None) == (written is None), (address, dialled, written)
    if dialled is not None and written is not None:
        assert written.spec().address == dialled


def test_what_the_grammar_accepts() -> None:
    a = ServerAddress.parse("ssh://cldcb@[2001:db8::5]:2222")
    assert (a.scheme, a.user, a.host, a.port) == ("ssh", "cldcb", "2001:db8::5", 2222)
    assert str(a) == "ssh://cldcb@[2001:db8::5]:2222"
    assert ServerAddress.parse("ssh://h").port == 22
    assert str(ServerAddress.parse(" 203.0.113.5:29735 ")) == "203.0.113.5:29735"
    with pytest.raises(UsageError, match="needs a port"):
        ServerAddress.parse("backup.example")
