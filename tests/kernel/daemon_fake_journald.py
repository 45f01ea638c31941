"""A stand-in journald for one daemon: run under `unshare --mount`, never in the host's view.

    unshare --mount --propagation private python daemon_fake_journald.py OUT NETNS -- ARGV...

In its private mount namespace it mounts a tmpfs over /run/systemd (hiding nothing outside),
binds /run/systemd/journal/socket (where libsystemd's sd_journal_send writes) and a notify
socket, starts ARGV inside network namespace NETNS with NOTIFY_SOCKET set (as systemd would),
and writes every journal datagram it receives as one JSON object per line to OUT, in journald's
native protocol fields, plus {"NOTIFY": "..."} lines for sd_notify datagrams. SIGTERM is passed
on to the daemon; the helper exits with the daemon's status.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native datagram: KEY=VALUE\\n, or KEY\\n<u64 le length>VALUE\\n."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.find(b"\n", i)
        if nl < 0:
            break
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode(errors="replace")
            i = nl + 1
        else:
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            out[line.decode()] = data[start:start + size].decode(errors="replace")
            i = start + size + 1
    return out


def main() -> int:
    out_path, netns = sys.argv[1], sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tagrouted-test", "/run/systemd"], check=True)
    os.makedirs("/run/systemd/journal", exist_ok=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind("/run/systemd/journal/socket")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("/run/systemd/notify-test")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TAGROUTED_LOG_JSON", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = "/run/systemd/notify-test"
    proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    with open(out_path, "a") as out:
        while True:
            ready, _, _ = select.select([journal, notify], [], [], 0.1)
            for sock in ready:
                data = sock.recv(1 << 20)
                doc = parse_native(data) if sock is journal else {"NOTIFY": data.decode(errors="replace")}
                out.write(json.dumps(doc) + "\n")
                out.flush()
            if not ready and proc.poll() is not None:
                return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
