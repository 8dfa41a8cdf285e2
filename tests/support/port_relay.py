"""A published port: ``python -m tests.support.port_relay LISTEN TARGET`` (each HOST:PORT)
accepts on LISTEN and relays every connection to TARGET, both ways, as Docker's proxy
for a published port does. The compose rehearsal runs one per port, in the namespace
that stands in for the machine (tests/support/compose_rehearsal.py)."""

from __future__ import annotations

import socket
import sys
import threading


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        server = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()  # nothing listening behind the port yet: refused, as Docker's would
        return
    server.settimeout(None)
    threading.Thread(target=_pump, args=(server, client), daemon=True).start()
    _pump(client, server)
    client.close()
    server.close()


def main(listen: str, target: str) -> None:
    host, port = listen.rsplit(":", 1)
    target_host, target_port = target.rsplit(":", 1)
    listener = socket.create_server((host, int(port)), backlog=128)
    print(f"relaying {listen} -> {target}", flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=_serve, args=(client, (target_host, int(target_port))), daemon=True
        ).start()


if __name__ == "__main__":
    main(*sys.argv[1:3])
