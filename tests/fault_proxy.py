"""A TCP proxy on loopback in front of a real server, that makes the faults a client must survive.

Per connection, `answer()` decides: bytes are sent back as the whole HTTP response, after the
request was read, and the connection is closed (a throttling or unavailable server); b"" closes it
without an answer (a server that died mid-request); None forwards the bytes both ways to the
upstream server. `drop_after` resets every forwarded connection after
that many seconds (a TCP RST, as from a load balancer's idle timeout or a restarted server). With `tls`, the proxy
terminates TLS with that server context and opens TLS to the upstream with `upstream_tls`, so it
can answer HTTPS clients itself (they authenticate by bearer token: a client certificate ends here).
s3server.SlowDownProxy (S3's 503 SlowDown) and the cluster tier's 429 proxy are made of it.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from typing import Callable


def http_answer(status: str, body: bytes = b"", content_type: str = "text/plain", headers: str = "") -> bytes:
    """A whole HTTP/1.1 response that closes its connection: `status` is e.g. "429 Too Many Requests"."""
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{headers}"
            "Connection: close\r\n\r\n").encode("latin-1") + body


class FaultProxy:
    def __init__(self, upstream: tuple[str, int] | None, answer: Callable[[], bytes | None],
                 tls: ssl.SSLContext | None = None, upstream_tls: ssl.SSLContext | None = None,
                 drop_after: float | None = None):
        self.upstream, self.answer, self.tls, self.upstream_tls = upstream, answer, tls, upstream_tls
        self.drop_after, self.refused, self.dropped = drop_after, 0, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def close(self) -> None:
        try:  # wakes the accept() blocked in the other thread: close() alone leaves the port listening
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)
            response = self.answer()
            if response is not None or self.upstream is None:
                self._refuse(conn, response)
            else:
                self._forward(conn)
        except OSError:  # the client went away (or failed the handshake)
            pass
        finally:
            conn.close()

    def _refuse(self, conn: socket.socket, response: bytes | None) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        headers = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        if "expect: 100-continue" not in headers:  # the body follows at once: read it first
            length = next((int(line.split(":", 1)[1]) for line in headers.split("\r\n")
                           if line.startswith("content-length:")), 0)
            body = len(head.split(b"\r\n\r\n", 1)[1])
            while body < length and (chunk := conn.recv(65536)):
                body += len(chunk)
        self.refused += 1
        conn.sendall(http_answer("503 Service Unavailable") if response is None else response)

    def _forward(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        if self.upstream_tls:
            upstream = self.upstream_tls.wrap_socket(upstream, server_hostname=self.upstream[0])
        # One thread moves both directions: an SSL socket must not be read and written at once.
        peer = {conn: upstream, upstream: conn}
        until = None if self.drop_after is None else time.monotonic() + self.drop_after
        try:
            while True:
                ready = [s for s in peer if isinstance(s, ssl.SSLSocket) and s.pending()]
                if not ready:
                    wait = None if until is None else until - time.monotonic()
                    if wait is not None and wait <= 0:
                        self.dropped += 1
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # closed with linger 0: the client reads ECONNRESET
                    ready = select.select(list(peer), [], [], wait)[0]
                for s in ready:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    peer[s].sendall(chunk)
        except OSError:
            pass
        finally:
            upstream.close()
