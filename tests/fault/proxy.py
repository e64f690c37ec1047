"""A TCP forwarding proxy for fault tests that can black-hole its connections.

:class:`BlackholeProxy` listens on 127.0.0.1 (a free port) and forwards bytes
both ways between each accepted client and ``target_host:target_port``, from a
background thread running a ``selectors`` loop (stdlib only)::

    with BlackholeProxy("127.0.0.1", redis.port) as proxy:
        url = proxy.url_for(redis.url)      # workers connect through the proxy
        ...
        proxy.blackhole()                   # silent network partition
        ...
        proxy.heal()                        # new connections work again

* :meth:`BlackholeProxy.blackhole`: from then on nothing is forwarded in either
  direction, on existing connections and on new ones (still accepted, never
  connected upstream). Bytes received meanwhile, and bytes buffered but not yet
  sent, are discarded; no FIN and no RST reach either side: just silence, as
  in a partition that drops packets.
* :meth:`BlackholeProxy.heal`: new connections are forwarded again; every
  connection that existed during the black hole is reset (RST to both sides),
  since its byte streams lost data.
* :meth:`BlackholeProxy.close` (or leaving the ``with`` block) stops the
  thread and resets every socket; it never hangs.

Both ``blackhole()`` and ``heal()`` return once the loop has applied them.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

CHUNK = 256 * 1024
BUFFER_LIMIT = 4 * 1024 * 1024  # stop reading a side while its peer has this much unsent
COMMAND_TIMEOUT = 10.0
_RETRY = (BlockingIOError, InterruptedError)


def _reset(sock: socket.socket | None) -> None:
    """Close ``sock`` with an RST (SO_LINGER 0) rather than a FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(eq=False)
class _Side:
    """One socket of a proxied connection and the bytes waiting to be sent to it."""

    sock: socket.socket
    outbox: bytearray = field(default_factory=bytearray)
    eof: bool = False  # it sent FIN (or we stopped reading it for good)
    shut: bool = False  # we sent it FIN
    events: int = 0  # currently registered selector events


@dataclass(eq=False)
class _Conn:
    client: _Side
    upstream: _Side | None = None  # None while black-holed from the start
    connecting: bool = False
    doomed: bool = False  # existed during a black hole: reset on heal

    def sides(self) -> list[_Side]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def peer(self, side: _Side) -> _Side | None:
        return self.upstream if side is self.client else self.client


class BlackholeProxy:
    """TCP proxy to ``target_host:target_port`` that can silently drop all traffic."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._commands: queue.SimpleQueue[tuple[str, threading.Event]] = queue.SimpleQueue()
        self._conns: set[_Conn] = set()
        self._blackholed = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.accepted = 0  # connections accepted so far (for tests)

    # ------------------------------------------------------------------ public API

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def url_for(self, url: str) -> str:
        """``url`` with its ``host:port`` replaced by the proxy's (user info kept).

        Works for ``redis://host:port/0`` and ``postgresql://user@host:port/db``.
        Raises ``ValueError`` if ``url`` names a port other than the target's.
        """
        parts = urlsplit(url)
        if parts.port is not None and parts.port != self.target[1]:
            raise ValueError(f"{url!r} does not point at the proxied port {self.target[1]}")
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{self.host}:{self.port}"))

    def start(self) -> Self:
        if self._thread is not None:
            return self
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._running = True
        self._thread = threading.Thread(
            target=self._run, name=f"blackhole-proxy:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def blackhole(self) -> None:
        """Stop forwarding, both ways, on all current and future connections."""
        self._command("blackhole")

    def heal(self) -> None:
        """Forward new connections again; reset those that lived through the black hole."""
        self._command("heal")

    def active_connections(self) -> int:
        """Connections currently open through the proxy (approximate, for tests)."""
        return len(self._conns)

    def close(self) -> None:
        """Stop the loop and reset every socket. Idempotent; never hangs."""
        thread, self._thread = self._thread, None
        self._running = False
        if thread is not None:
            self._wake()
            thread.join(timeout=5.0)
        for conn in list(self._conns):
            self._abort(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(Exception):
            self._selector.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ commands

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _command(self, name: str) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError(f"proxy not running (failure: {self._failure!r})")
        done = threading.Event()
        self._commands.put((name, done))
        self._wake()
        if not done.wait(COMMAND_TIMEOUT):
            raise TimeoutError(f"proxy loop did not apply {name!r} (failure: {self._failure!r})")

    def _apply_commands(self) -> None:
        while True:
            try:
                name, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if name == "blackhole":
                self._blackholed = True
                for conn in list(self._conns):
                    self._doom(conn)
            elif name == "heal":
                self._blackholed = False
                for conn in [c for c in self._conns if c.doomed]:
                    self._abort(conn)
            done.set()

    def _doom(self, conn: _Conn) -> None:
        conn.doomed = True
        for side in conn.sides():
            side.outbox.clear()
        self._update(conn)

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        try:
            while self._running:
                events = self._selector.select(timeout=1.0)
                self._apply_commands()
                for key, mask in events:
                    self._dispatch(key, mask)
        except BaseException as exc:  # recorded for _command; the test sees it there
            self._failure = exc
            raise
        finally:
            self._running = False

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listener":
            self._accept()
        elif key.data == "wake":
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
        else:
            conn, side = key.data
            if conn not in self._conns:
                return  # closed earlier in this round
            try:
                self._on_event(conn, side, mask)
            except OSError:
                self._abort(conn)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except _RETRY:
                return
            except OSError:
                return  # e.g. EMFILE / ECONNABORTED: try again on the next event
            _tune(sock)
            self.accepted += 1
            conn = _Conn(client=_Side(sock))
            self._conns.add(conn)
            if self._blackholed:
                conn.doomed = True  # accepted, never answered
            else:
                self._connect_upstream(conn)
            self._update(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _tune(sock)
        conn.upstream = _Side(sock)
        conn.connecting = True
        err = sock.connect_ex(self.target)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise OSError(err, f"connect to {self.target}: {errno.errorcode.get(err, err)}")

    def _on_event(self, conn: _Conn, side: _Side, mask: int) -> None:
        if conn.connecting and side is conn.upstream and mask & selectors.EVENT_WRITE:
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {self.target} failed")
            conn.connecting = False
        if mask & selectors.EVENT_READ:
            self._read(conn, side)
        if not conn.doomed and conn in self._conns:
            for s in conn.sides():
                self._flush(conn, s)
        if conn in self._conns:
            self._update(conn)

    def _read(self, conn: _Conn, side: _Side) -> None:
        try:
            data = side.sock.recv(CHUNK)
        except _RETRY:
            return
        if not data:
            side.eof = True
            return
        peer = conn.peer(side)
        if conn.doomed or peer is None:
            return  # black hole: discard
        peer.outbox += data

    def _flush(self, conn: _Conn, side: _Side) -> None:
        """Send ``side``'s pending bytes; propagate the peer's FIN once all are sent."""
        if side is conn.upstream and conn.connecting:
            return
        while side.outbox:
            try:
                sent = side.sock.send(side.outbox)
            except _RETRY:
                return
            del side.outbox[:sent]
        peer = conn.peer(side)
        if peer is not None and peer.eof and not side.shut:
            side.shut = True
            side.sock.shutdown(socket.SHUT_WR)
        if all(s.eof and s.shut and not s.outbox for s in conn.sides()) and conn.upstream:
            self._close(conn)

    def _wanted(self, conn: _Conn, side: _Side) -> int:
        if side is conn.upstream and conn.connecting:
            return selectors.EVENT_WRITE
        events = 0
        if not side.eof:
            peer = conn.peer(side)
            if conn.doomed or peer is None or len(peer.outbox) < BUFFER_LIMIT:
                events |= selectors.EVENT_READ
        if side.outbox and not conn.doomed:
            events |= selectors.EVENT_WRITE
        return events

    def _update(self, conn: _Conn) -> None:
        for side in conn.sides():
            wanted = self._wanted(conn, side)
            if wanted == side.events:
                continue
            if side.events == 0:
                self._selector.register(side.sock, wanted, (conn, side))
            elif wanted == 0:
                self._selector.unregister(side.sock)
            else:
                self._selector.modify(side.sock, wanted, (conn, side))
            side.events = wanted

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for side in conn.sides():
            if side.events:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(side.sock)
                side.events = 0

    def _close(self, conn: _Conn) -> None:
        self._forget(conn)
        for side in conn.sides():
            with contextlib.suppress(OSError):
                side.sock.close()

    def _abort(self, conn: _Conn) -> None:
        self._forget(conn)
        for side in conn.sides():
            _reset(side.sock)
