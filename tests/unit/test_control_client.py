"""The control client against a daemon that refuses before reading (peer credentials): the
refusal is what the user sees, not the broken pipe of a request the daemon never read."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tagrouted.daemon.control import Refused, request, socket_path


def test_a_refusal_sent_before_the_request_was_read_is_reported(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path(str(tmp_path)))
    server.listen(1)

    def refuse() -> None:
        conn, _ = server.accept()
        conn.sendall(b'{"ok": false, "error": "permission denied: uid 65534 is not root"}\n')
        conn.close()  # without reading: the client's write then fails with EPIPE

    t = threading.Thread(target=refuse)
    t.start()
    try:
        # larger than the socket buffers: the write is still going on when the server closes
        with pytest.raises(Refused, match="uid 65534 is not root"):
            request(str(tmp_path), {"command": "status", "pad": "x" * (4 << 20)})
    finally:
        t.join(5)
        server.close()
