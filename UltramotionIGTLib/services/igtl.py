"""OpenIGTLink transport for the gateway: pyigtl's message codec on sockets the gateway owns.

pyigtl (0.3.4) does two jobs: the wire format (`pyigtl.MessageBase.pack`, ``parse_header``,
``create_message``/``unpack``, the CRC-64) and the communication classes (`pyigtl.OpenIGTLinkServer`
/ `pyigtl.OpenIGTLinkClient`). The gateway uses the first and not the second, because of how
``pyigtl/comm.py`` behaves, which conflicts with a real-time relay:

- received messages go into a dict keyed by device name (the newest overwrites the previous one):
  a receiver can neither see every frame nor count the ones it missed;
- ``recv()`` returning ``b""`` (the peer closed the connection) is read as "no message yet": a
  client never notices that PLUS went away, never reconnects, and its thread spins;
- the server serves one client at a time and installs SIGINT/SIGTERM handlers in its constructor
  (which fails outside the main thread);
- sends run in the receive loop with a 10 ms socket timeout: a reader that is a little slow aborts
  the connection mid-message; the outgoing deque silently drops beyond 100 messages;
- received bodies are not CRC-checked and a garbled header raises in the receive thread;
- its loops poll every 10 ms, which adds up to that much latency per hop.

What this module provides instead:

- `MessageReader`: an incremental stream parser (no I/O). It validates each 58-byte header
  (version 1 or 2, a type name of letters, digits and ``_``, a UTF-8 device name, a sane body size),
  checks the body's CRC-64, decodes IMAGE / TRANSFORM / STRING / POINT / POSITION with pyigtl, and
  reports everything else as a `BadMessage` with a reason. After garbage bytes it resynchronises on
  the next valid header, so the stream goes on; an oversized body is skipped without buffering it.
- `IgtlServer`: accepts any number of clients. ``broadcast`` only queues: each client has a bounded
  queue (newest wins: the oldest queued payload is dropped and counted) drained by its own sender
  thread, and a send that makes no progress for ``send_timeout_s`` disconnects that client. A slow,
  stalled or vanished client therefore never blocks the caller.
- `IgtlClient`: connects, reconnects with exponential backoff after a refusal, a lost connection or
  (optionally) a silent one, and logs each change of state once.

Sockets are non-blocking and every wait is a ``select`` with a short timeout, so stopping never
hangs and the code runs unchanged on Linux, macOS and Windows.
"""

from __future__ import annotations

import importlib
import logging
import re
import select
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger("UltramotionIGTLib.services.igtl")

HEADER_SIZE = 58
_HEADER = struct.Struct("> H 12s 20s I I Q Q")
DEFAULT_MAX_BODY_BYTES = 256 * 2**20
"""Bodies larger than this are skipped (counted as ``too_large``); 256 MiB holds any 2-D frame."""
_SANE_BODY_BYTES = 2**34
"""A header announcing more than this is taken as garbage rather than as a message to skip."""
_TYPE_RE = re.compile(rb"[A-Za-z][A-Za-z0-9_]{0,11}\x00*")
_NAME_RE = re.compile(rb"[^\x00-\x1f\x7f]*\x00*")
#: Message types pyigtl decodes; others are reported as ``unsupported_type``.
DECODED_TYPES = ("IMAGE", "TRANSFORM", "STRING", "POINT", "POSITION")
_POLL_S = 0.1
_RECV_BYTES = 1 << 20


def pyigtl_module() -> Any:
    """The pyigtl module (imported on first use), or a clear error when it is missing."""
    try:
        return importlib.import_module("pyigtl")
    except ImportError as exc:  # a runtime dependency; say how to get it
        from UltramotionIGTLib.errors import UltramotionError

        raise UltramotionError(
            "the OpenIGTLink gateway needs pyigtl: pip install pyigtl (it is in the project's dependencies)"
        ) from exc


def crc_is_native() -> bool:
    """True when crcmod's C extension computes pyigtl's CRC-64 (pure Python takes ~1 s per MB)."""
    try:
        return bool(importlib.import_module("crcmod.crcmod")._usingExtension)
    except (ImportError, AttributeError):
        return False


@dataclass(frozen=True)
class BadMessage:
    """Bytes on the stream that did not become a usable message.

    ``reason``: ``garbage`` (bytes before the next valid header), ``crc`` (body checksum mismatch),
    ``too_large`` (body over the reader's limit, skipped), ``unsupported_type`` (well-formed, but a
    type pyigtl does not decode), ``pixel_type`` (IMAGE with a scalar type OpenIGTLink does not
    define), ``malformed`` (the body does not decode) or ``truncated`` (the connection closed
    mid-message). ``size``: bytes concerned.
    """

    reason: str
    detail: str
    message_type: str = ""
    device_name: str = ""
    size: int = 0


def _parse_header(buf: bytearray | bytes, offset: int = 0) -> dict[str, Any] | None:
    """The header at ``offset`` as pyigtl's header fields plus ``crc``, or None when it is not one."""
    version, mtype, dname, _sec, _frac, body_size, crc = _HEADER.unpack_from(buf, offset)
    if version not in (1, 2) or body_size > _SANE_BODY_BYTES:
        return None
    if not _TYPE_RE.fullmatch(mtype) or not _NAME_RE.fullmatch(dname):
        return None
    try:
        dname.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields = pyigtl_module().MessageBase.parse_header(bytes(buf[offset : offset + HEADER_SIZE]))
    fields["crc"] = crc
    return fields


class MessageReader:
    """Turns a byte stream into pyigtl messages and `BadMessage` records (see the module docstring).

    >>> reader = MessageReader()
    >>> for item in reader.feed(sock.recv(65536)): ...

    ``max_body_bytes``: larger bodies are skipped. ``check_crc``: verify each body's CRC-64
    (pyigtl's ``CRC64``; the header's last field).
    """

    def __init__(self, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, check_crc: bool = True) -> None:
        self.max_body_bytes = int(max_body_bytes)
        self.check_crc = check_crc
        self._buf = bytearray()
        self._discard = 0
        self._garbage = 0
        self._skipping: tuple[str, str] | None = None
        self.bytes_received = 0

    def feed(self, data: bytes) -> list[Any]:
        """Add received bytes; return the messages and `BadMessage` records completed by them."""
        self.bytes_received += len(data)
        self._buf += data
        out: list[Any] = []
        buf = self._buf
        while True:
            if self._discard:
                n = min(self._discard, len(buf))
                del buf[:n]
                self._discard -= n
                if self._discard:
                    break
            if len(buf) < HEADER_SIZE:
                break
            header = _parse_header(buf)
            if header is None:
                if not self._resync():
                    break
                continue
            if self._garbage:
                out.append(self._garbage_record())
            size = int(header["body_size"])
            if size > self.max_body_bytes:
                out.append(
                    BadMessage(
                        "too_large",
                        f"{header['message_type']} body of {size} bytes is over the {self.max_body_bytes}-byte "
                        "limit: skipped",
                        header["message_type"],
                        header["device_name"],
                        size,
                    )
                )
                del buf[:HEADER_SIZE]
                self._discard = size
                continue
            if len(buf) < HEADER_SIZE + size:
                break
            body = bytes(buf[HEADER_SIZE : HEADER_SIZE + size])
            del buf[: HEADER_SIZE + size]
            out.append(self._decode(header, body))
        if self._garbage > self.max_body_bytes:  # a long run of noise: report it without waiting for its end
            out.append(self._garbage_record())
        return out

    def close(self) -> list[BadMessage]:
        """The stream ended: report what is left over (garbage, or a message cut short)."""
        out = []
        if self._garbage:
            out.append(self._garbage_record())
        pending = len(self._buf) + self._discard
        if pending:
            out.append(
                BadMessage("truncated", f"the connection closed {pending} bytes short of a message end")
            )
        self._buf.clear()
        self._discard = 0
        return out

    def _garbage_record(self) -> BadMessage:
        n, self._garbage = self._garbage, 0
        return BadMessage("garbage", f"{n} bytes that are not OpenIGTLink messages skipped", size=n)

    def _resync(self) -> bool:
        """Drop bytes up to the next valid header. True when one is at the front now."""
        buf = self._buf
        start = 1
        while True:
            cands = [i for i in (buf.find(b"\x00\x01", start), buf.find(b"\x00\x02", start)) if i >= 0]
            if not cands:
                keep = 1 if buf[-1:] == b"\x00" else 0  # may start the next header
                self._garbage += len(buf) - keep
                del buf[: len(buf) - keep]
                return False
            i = min(cands)
            if i + HEADER_SIZE > len(buf):
                self._garbage += i
                del buf[:i]
                return False
            if _parse_header(buf, i) is not None:
                self._garbage += i
                del buf[:i]
                return True
            start = i + 1

    def _decode(self, header: dict[str, Any], body: bytes) -> Any:
        pyigtl = pyigtl_module()
        mtype, name = header["message_type"], header["device_name"]
        if self.check_crc:
            crc = pyigtl.messages.CRC64(body)
            if crc != header["crc"]:
                return BadMessage(
                    "crc",
                    f"{mtype} body CRC-64 {crc:#018x} != header {header['crc']:#018x}",
                    mtype,
                    name,
                    len(body),
                )
        if mtype not in DECODED_TYPES:
            return BadMessage("unsupported_type", f"{mtype} messages are not used", mtype, name, len(body))
        if mtype == "IMAGE":
            offset = 12 if header["header_version"] > 1 else 0  # OpenIGTLink v3 extended header
            if len(body) >= offset + 4 and body[offset + 3] not in pyigtl.ImageMessage.scalar_types:
                return BadMessage(
                    "pixel_type",
                    f"IMAGE scalar type {body[offset + 3]} is not an OpenIGTLink pixel type",
                    mtype,
                    name,
                    len(body),
                )
        message = pyigtl.MessageBase.create_message(mtype)
        try:
            message.unpack(header, body)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad message, not a crash
            return BadMessage(
                "malformed",
                f"{mtype} body does not decode ({type(exc).__name__}: {exc})",
                mtype,
                name,
                len(body),
            )
        return message


# -- connections ------------------------------------------------------------------------------------


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


def _send_all(sock: socket.socket, data: bytes, timeout_s: float, stopped: Callable[[], bool]) -> None:
    """Send ``data`` on a non-blocking socket; TimeoutError when no byte goes out for ``timeout_s``."""
    view = memoryview(data)
    last_progress = time.monotonic()
    while view:
        if stopped():
            raise ConnectionAbortedError("connection closed while sending")
        if time.monotonic() - last_progress > timeout_s:
            raise TimeoutError(f"the peer accepted no data for {timeout_s:g} s")
        _, writable, _ = select.select([], [sock], [], _POLL_S)
        if not writable:
            continue
        try:
            n = sock.send(view)
        except (BlockingIOError, InterruptedError):
            continue
        if n:
            view = view[n:]
            last_progress = time.monotonic()


class Connection:
    """One connected socket: a receiving thread (`MessageReader` -> ``on_message``) and a sending
    thread draining a queue of at most ``queue_limit`` payloads (bytes of packed messages).

    ``on_message(connection, item)`` gets each message or `BadMessage`, on the receiving thread;
    ``on_closed(connection, reason)`` is called once, after both threads ended.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        on_message: Callable[[Connection, Any], None] | None = None,
        on_closed: Callable[[Connection, str], None] | None = None,
        queue_limit: int = 2,
        send_timeout_s: float = 5.0,
        reader: MessageReader | None = None,
    ) -> None:
        _configure(sock)
        self.sock = sock
        self.peer = peer
        self.on_message = on_message
        self.on_closed = on_closed
        self.queue_limit = max(1, int(queue_limit))
        self.send_timeout_s = float(send_timeout_s)
        self.reader = reader or MessageReader()
        self.close_reason: str | None = None
        self.connected_at = time.time()
        self.payloads_sent = 0
        self.payloads_dropped = 0
        self.bytes_sent = 0
        self._queue: deque[bytes] = deque()
        self._sending = False
        self._cond = threading.Condition()
        self._alive = 2
        self._threads = [
            threading.Thread(target=self._recv_loop, name=f"igtl-recv {peer}", daemon=True),
            threading.Thread(target=self._send_loop, name=f"igtl-send {peer}", daemon=True),
        ]

    def start(self) -> Connection:
        for t in self._threads:
            t.start()
        return self

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being sent."""
        with self._cond:
            return not self._queue and not self._sending

    def enqueue(self, payload: bytes) -> bool:
        """Queue ``payload`` for sending; returns False when an older payload was dropped to make room
        (or the connection is closed). Never blocks on the network."""
        with self._cond:
            if self.closed:
                return False
            dropped = False
            while len(self._queue) >= self.queue_limit:
                self._queue.popleft()
                self.payloads_dropped += 1
                dropped = True
            self._queue.append(payload)
            self._cond.notify()
        return not dropped

    def close(self, reason: str = "closed") -> None:
        """Close (idempotent): both threads end within a poll interval; ``on_closed`` follows."""
        with self._cond:
            if self.close_reason is None:
                self.close_reason = reason
            self._cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def _thread_done(self) -> None:
        with self._cond:
            self._alive -= 1
            last = self._alive == 0
        if last:
            try:
                self.sock.close()
            except OSError:
                pass
            if self.on_closed is not None:
                self.on_closed(self, self.close_reason or "closed")

    def _deliver(self, items: list[Any]) -> None:
        if self.on_message is None:
            return
        for item in items:
            try:
                self.on_message(self, item)
            except Exception:  # noqa: BLE001 - a handler bug must not kill the connection
                LOG.exception("message handler failed for a message from %s", self.peer)

    def _recv_loop(self) -> None:
        try:
            while not self.closed:
                try:
                    readable, _, _ = select.select([self.sock], [], [], _POLL_S)
                except (OSError, ValueError):
                    self.close("socket error")
                    break
                if not readable:
                    continue
                try:
                    data = self.sock.recv(_RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self.close(f"receive failed ({type(exc).__name__}: {exc})")
                    break
                if not data:
                    self.close("closed by peer")
                    break
                self._deliver(self.reader.feed(data))
            self._deliver(self.reader.close())
        finally:
            self._thread_done()

    def _send_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self.closed:
                        self._cond.wait(_POLL_S)
                    if self.closed:
                        break
                    payload = self._queue.popleft()
                    self._sending = True
                try:
                    _send_all(self.sock, payload, self.send_timeout_s, lambda: self.closed)
                except TimeoutError as exc:
                    self.close(f"stalled: {exc}")
                    break
                except OSError as exc:
                    if not self.closed:
                        self.close(f"send failed ({type(exc).__name__}: {exc})")
                    break
                finally:
                    with self._cond:
                        self._sending = False
                self.payloads_sent += 1
                self.bytes_sent += len(payload)
        finally:
            self._thread_done()


# -- server -----------------------------------------------------------------------------------------


class IgtlServer:
    """An OpenIGTLink server for any number of clients; ``broadcast`` never blocks (module docstring).

    ``host``/``port``: where to listen (port 0: any free port; `start` returns the one bound).
    ``on_message(connection, item)``: messages the clients send (on their receiving threads).
    ``on_connect(connection)`` / ``on_disconnect(connection, reason)``: connection events.
    ``queue_limit``: payloads queued per client before the oldest is dropped; ``send_timeout_s``:
    a client that accepts no byte for this long is disconnected (``stalled``).
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        name: str = "server",
        on_message: Callable[[Connection, Any], None] | None = None,
        on_connect: Callable[[Connection], None] | None = None,
        on_disconnect: Callable[[Connection, str], None] | None = None,
        queue_limit: int = 2,
        send_timeout_s: float = 5.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.host = host
        self.requested_port = int(port)
        self.port: int | None = None
        self.name = name
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.queue_limit = queue_limit
        self.send_timeout_s = send_timeout_s
        self.max_body_bytes = max_body_bytes
        self.connects = 0
        self.disconnects: Counter[str] = Counter()
        self.payloads_dropped = 0
        self._conns: list[Connection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and listen; returns the port. Raises OSError when the port cannot be bound."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.requested_port))
            listener.listen(8)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"igtl-accept {self.name}", daemon=True
        )
        self._thread.start()
        LOG.info("%s listening on %s:%d", self.name, self.host, self.port)
        return self.port

    @property
    def connections(self) -> list[Connection]:
        with self._lock:
            return [c for c in self._conns if not c.closed]

    def broadcast(self, payload: bytes) -> tuple[int, int]:
        """Queue ``payload`` for every connected client. Returns (clients it was queued for, clients
        whose queue was full so that their oldest payload was dropped)."""
        conns = self.connections
        dropped = 0
        for conn in conns:
            if not conn.enqueue(payload):
                dropped += 1
        if dropped:
            with self._lock:
                self.payloads_dropped += dropped
        return len(conns), dropped

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, close every client, wait for the threads (at most ``timeout`` each)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close("server stopped")
        for conn in conns:
            conn.join(timeout)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([self._listener], [], [], _POLL_S)
            except (OSError, ValueError):
                break
            if not readable:
                continue
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                break
            peer = f"{addr[0]}:{addr[1]}"
            conn = Connection(
                sock,
                peer,
                on_message=self.on_message,
                on_closed=self._closed,
                queue_limit=self.queue_limit,
                send_timeout_s=self.send_timeout_s,
                reader=MessageReader(self.max_body_bytes),
            )
            with self._lock:
                self._conns.append(conn)
                self.connects += 1
            LOG.info("%s: client %s connected", self.name, peer)
            if self.on_connect is not None:
                self.on_connect(conn)
            conn.start()

    def _closed(self, conn: Connection, reason: str) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
            self.disconnects[_reason_kind(reason)] += 1
        level = logging.INFO if reason in ("closed by peer", "server stopped") else logging.WARNING
        LOG.log(level, "%s: client %s disconnected (%s)", self.name, conn.peer, reason)
        if self.on_disconnect is not None:
            self.on_disconnect(conn, reason)


def _reason_kind(reason: str) -> str:
    """A short counter key for a close reason ("stalled: ..." -> "stalled")."""
    for kind in ("stalled", "closed by peer", "server stopped", "send failed", "receive failed"):
        if reason.startswith(kind):
            return kind.replace(" ", "_")
    return "other"


# -- client -----------------------------------------------------------------------------------------


class IgtlClient:
    """An OpenIGTLink client that stays connected: exponential backoff between attempts, a log line
    per change of state (not per attempt).

    ``on_message(item)``: each message or `BadMessage`, on the client's thread. ``on_connect()`` /
    ``on_disconnect(reason)``: state changes. ``idle_timeout_s``: reconnect when a connection has
    been silent this long (None: never; PLUS may legitimately pause). ``check_crc``: verify each
    body's CRC-64.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        name: str = "PLUS",
        on_message: Callable[[Any], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        connect_timeout_s: float = 2.0,
        idle_timeout_s: float | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        check_crc: bool = True,
    ) -> None:
        self.host, self.port, self.name = host, int(port), name
        self.check_crc = check_crc
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_body_bytes = max_body_bytes
        self.connects = 0
        self.disconnects = 0  # connections lost (not counting `stop`)
        self.failed_attempts = 0
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"igtl-client {name}", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> IgtlClient:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _deliver(self, items: list[Any]) -> None:
        if self.on_message is None:
            return
        for item in items:
            try:
                self.on_message(item)
            except Exception:  # noqa: BLE001 - a handler bug must not kill the connection
                LOG.exception("message handler failed for a message from %s", self.name)

    def _run(self) -> None:
        delay = self.backoff_initial_s
        outage_since: float | None = None
        last_notice = 0.0
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
            except OSError as exc:
                self.failed_attempts += 1
                now = time.monotonic()
                if outage_since is None:
                    outage_since = last_notice = now
                    LOG.warning(
                        "%s at %s unreachable (%s); retrying with backoff up to %g s",
                        self.name,
                        self.address,
                        exc.strerror or type(exc).__name__,
                        self.backoff_max_s,
                    )
                elif now - last_notice > 30.0:
                    last_notice = now
                    LOG.info(
                        "%s at %s still unreachable after %.0f s", self.name, self.address, now - outage_since
                    )
                self._stop.wait(delay)
                delay = min(delay * 2.0, self.backoff_max_s)
                continue
            outage_since = None
            delay = self.backoff_initial_s
            self.connects += 1
            self.connected = True
            LOG.info("%s: connected to %s", self.name, self.address)
            if self.on_connect is not None:
                self.on_connect()
            reason = self._receive(sock)
            self.connected = False
            try:
                sock.close()
            except OSError:
                pass
            if self._stop.is_set():
                break
            self.disconnects += 1
            LOG.warning("%s at %s: connection lost (%s); reconnecting", self.name, self.address, reason)
            if self.on_disconnect is not None:
                self.on_disconnect(reason)
            self._stop.wait(delay)

    def _receive(self, sock: socket.socket) -> str:
        _configure(sock)
        reader = MessageReader(self.max_body_bytes, self.check_crc)
        last_data = time.monotonic()
        reason = "stopped"
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], _POLL_S)
            except (OSError, ValueError) as exc:
                reason = f"socket error ({exc})"
                break
            if not readable:
                if self.idle_timeout_s is not None and time.monotonic() - last_data > self.idle_timeout_s:
                    reason = f"no data for {self.idle_timeout_s:g} s"
                    break
                continue
            try:
                data = sock.recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc}"
                break
            if not data:
                reason = "closed by peer"
                break
            last_data = time.monotonic()
            self._deliver(reader.feed(data))
        if not self._stop.is_set():  # a message cut short by our own stop is not the peer's fault
            self._deliver(reader.close())
        return reason
