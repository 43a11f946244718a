"""A TCP proxy on 127.0.0.1 that breaks connections on purpose, between a client and a real server."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import sys
import termios
import threading
import time


class FaultProxy:
    """Forwards every connection to `upstream_port`.

    `reset_after(n, times)`: the next `times` connections that send more than n bytes of
    answers are reset (RST) at that point, the way a load balancer or a dying pod does;
    `reset_every(n)`: all of them, a flaky link. `connections` counts the connections served and
    `bytes_down` the bytes of answers that reached the client, so a test can bound both.
    `kill()`: every open connection is reset and new ones are refused until `revive()`.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_after: int | None = None
        self.cuts_left = 0
        self.cuts_done = 0
        self.connections = 0
        self.bytes_down = 0
        self.up_limit: int | None = None  # kill everything once this many request bytes went upstream
        self.up_bytes = 0
        self.dead = False
        self.die_on_cut = False  # after a reset, refuse everything: the endpoint itself went away
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_after(self, n: int, times: int) -> None:
        with self._lock:
            self.cut_after, self.cuts_left = n, times

    def reset_every(self, n: int) -> None:
        self.reset_after(n, times=sys.maxsize)

    def kill(self) -> None:
        with self._lock:
            self.dead = True
            sockets, self._open = self._open, []
        for sock in sockets:
            _reset(sock)

    def revive(self) -> None:
        with self._lock:
            self.dead, self.up_limit = False, None

    def close(self) -> None:
        self.kill()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.dead:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._open += [client, upstream]
        threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                with self._lock:
                    cut = self.cut_after is not None and self.cuts_left > 0 and sent + len(data) > self.cut_after
                    if cut:
                        self.cuts_left -= 1
                        self.cuts_done += 1
                        keep = max(0, self.cut_after - sent)
                if cut:
                    client.sendall(data[:keep])
                    self._count_down(keep)
                    _drain(client)
                    if self.die_on_cut:
                        self.kill()
                    break
                client.sendall(data)
                self._count_down(len(data))
                sent += len(data)
        except OSError:
            pass
        _reset(client)
        _reset(upstream)

    def _count_down(self, n: int) -> None:
        with self._lock:
            self.bytes_down += n

    def _pump_up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
                with self._lock:
                    self.up_bytes += len(data)
                    over = self.up_limit is not None and self.up_bytes > self.up_limit
                if over:
                    self.kill()
                    return
        except OSError:
            pass


def _drain(sock: socket.socket, wait_s: float = 5.0) -> None:
    """Wait (a while at most) until the peer has every byte sent: a reset discards what is still
    queued to go, so without this "reset after n bytes" would deliver fewer, as many fewer as
    the socket buffers hold."""
    deadline = time.monotonic() + wait_s
    with contextlib.suppress(OSError):
        while fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0") != b"\0\0\0\0" and time.monotonic() < deadline:
            time.sleep(0.001)


def _reset(sock: socket.socket) -> None:
    """Close with RST; shutting the read side first wakes a thread blocked reading it (a bare
    close would leave the connection open until that read returned)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()
