"""The reward server: any reward behind the protocol of :mod:`rewards.remote`, fit to face a network.

``launch/reward_server.py`` is its command line. What a request may hold and take is bounded by
:class:`ServerLimits`; everything past a limit is refused with a JSON ``{"error": ...}`` and a 4xx status, and
the server goes on serving:

- the body: ``Content-Length`` is required (411 without it, 400 when it is not a number) and at most
  ``max_body_bytes`` (413, before the body is read);
- the JSON: at most ``max_json_depth`` levels deep (400), and at most ``max_json_items`` items (its commas and
  colons, counted before parsing: 413), so a body of tiny items (``[{},{},...]``, 20-30x its size as Python
  objects) is refused before it is parsed;
- the images: at most ``max_images`` per request, ``max_pixels`` each and ``max_request_pixels`` together (413),
  the sizes read from the PNG headers before anything is decoded, so small PNGs claiming 20000x20000 (a plain
  image compresses ~1000x) cost nothing; PNG only (400);
- time: a client has ``header_timeout`` seconds for its request line and headers (a few hundred bytes, read before
  its token is checked, so strangers cannot hold the workers for long) and ``read_timeout`` seconds for its whole
  request, or its connection is dropped;
- threads: ``workers`` connections are handled at once; the next ones wait in a listen backlog of ``backlog``.

Calls to the reward, and the decoding before them, are serialised by a lock, so the reward need not be
thread-safe and one request's pixels are in memory at a time. Memory is then at most about
``3 * max_body_bytes * workers`` for requests being read and parsed, plus ``12 * max_request_pixels`` bytes for
the request being scored (float32 RGB, decoded into one tensor an image at a time; 805 MB at the default).

With a token, every request needs ``Authorization: Bearer <token>`` (compared in constant time) or gets 401, after
which the rest of its body is read for ``UNAUTHORISED_DRAIN_S`` at most (not ``read_timeout``): a client without
the token holds a worker for its headers (``header_timeout`` at most) and a second, no longer.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import io
import json
import logging
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from rewards.base import Reward, check_scores
from rewards.remote import DeadlineReader, check_token, decode_images

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNAUTHORISED_DRAIN_S = 1.0  # how long a refused stranger's body is read (and dropped) so the 401 reaches it


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request; each is an option of ``launch/reward_server.py`` (``max_body_bytes`` in MiB, as
    ``--max_body_mb``) with the same default.

    Attributes:
        max_body_bytes: the largest request body. 64 images of 1024x1024 take 100-250 MB as base64 PNG.
        max_images: images per request; the client's ``batch_size`` must not exceed it.
        max_pixels: width x height of one image. 2048x2048 by default; FLUX's usual sizes are far below.
        max_request_pixels: width x height summed over a request's images: 64 images of 1024x1024 by default.
            The server holds them as float32 RGB, 12 bytes a pixel, whatever the body's size.
        max_json_depth: nesting of the request's JSON (the protocol needs 3, plus what metadata nests).
        max_json_items: commas and colons in the request's JSON: its prompts' and metadata's items (a shapes
            prompt's metadata has about 20; 65536 leaves room for boxes or embeddings). Parsed, an item costs
            about 100 bytes, so this bounds the objects a body becomes, whatever its size.
        read_timeout: seconds a client has to send its whole request, from connecting to the body's last byte.
        header_timeout: seconds a client has to send its request line and headers, from connecting (capped by
            ``read_timeout``): before its token is read a client may be anyone, and a slow one holds a worker.
        workers: connections handled at once; each holds at most one body in memory.
        backlog: connections the kernel queues while every worker is busy (capped by ``net.core.somaxconn``).
    """

    max_body_bytes: int = 256 * 2**20
    max_images: int = 64
    max_pixels: int = 2048 * 2048
    max_request_pixels: int = 64 * 1024 * 1024
    max_json_depth: int = 32
    max_json_items: int = 65536
    read_timeout: float = 60.0
    header_timeout: float = 5.0
    workers: int = 8
    backlog: int = 128

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            problem = limit_violation(field.name, getattr(self, field.name))
            if problem:
                raise ValueError(f"ServerLimits.{field.name} {problem}")


# each limit's bound (0 where a server would refuse or drop every request) and its reason
LIMIT_BOUNDS = {
    "max_body_bytes": (">", 0, "the largest request body; it must hold a request's images"),
    "max_images": (">=", 1, "a request of more images is refused"),
    "max_pixels": (">=", 1, "an image of more pixels is refused"),
    "max_request_pixels": (">=", 1, "a request of more pixels, over all its images, is refused"),
    "max_json_depth": (">=", 3, "a request nests 3 levels before its metadata does"),
    "max_json_items": (">=", 3, "a request's JSON holds at least 3 commas and colons"),
    "read_timeout": (">", 0, "seconds a client has to send its whole request"),
    "header_timeout": (">", 0, "seconds a client has to send its request line and headers"),
    "workers": (">=", 1, "requests are served by that many threads"),
    "backlog": (">=", 0, "connections queued while every worker is busy"),
}


def limit_violation(name: str, value: float) -> str | None:
    """What is wrong with ``value`` for limit ``name`` ("must be >= 1 (why), got 0"), or None when it is valid."""
    op, bound, meaning = LIMIT_BOUNDS[name]
    if value > bound if op == ">" else value >= bound:  # NaN fails both
        return None
    return f"must be {op} {bound} ({meaning}), got {value}"


def address_family(host: str) -> socket.AddressFamily:
    """The socket family that binds ``host``: IPv6 for an IPv6 address (``::1``, ``::``), else IPv4."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def base_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Refused(Exception):
    """A request past a limit or malformed: ``status`` and the message the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def png_size(text: str) -> tuple[int, int]:
    """``(width, height)`` from the IHDR chunk of a base64 PNG, decoding only its first 24 bytes.

    Raises:
        ValueError: when the text does not start like a base64 PNG.
    """
    try:
        header = base64.b64decode(text[:32], validate=True)  # signature, IHDR length and type, width, height
    except ValueError as error:
        raise ValueError(f"not base64 ({error})") from error
    if len(header) < 24 or header[:8] != PNG_SIGNATURE or header[12:16] != b"IHDR":
        raise ValueError("not a PNG (the protocol sends images as base64 PNG)")
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def parse_request(raw: bytes, limits: ServerLimits) -> tuple[list[str], list[str], list[dict]]:
    """A ``/score`` body -> ``(images, prompts, metadata)``, every limit checked and nothing decoded yet.

    Raises:
        Refused: 400 for malformed JSON, JSON nested too deep, missing fields or mismatched lengths; 413 for
            too many images, too many JSON items or an image of too many pixels.
    """
    items = raw.count(b",") + raw.count(b":")
    if items > limits.max_json_items:  # base64 holds neither: a valid request's count is its prompts' and metadata's
        raise Refused(
            413, f"a JSON body of {items} items (commas and colons); the server takes at most --max_json_items "
            f"{limits.max_json_items}",
        )  # fmt: skip
    try:
        request = json.loads(raw)
    except RecursionError as error:  # deeper than Python's own recursion limit
        raise Refused(400, f"JSON nested deeper than --max_json_depth {limits.max_json_depth}") from error
    except ValueError as error:
        raise Refused(400, f"malformed request (not JSON: {error})") from error
    if _too_deep(request, limits.max_json_depth):
        raise Refused(400, f"JSON nested deeper than --max_json_depth {limits.max_json_depth}")
    if not isinstance(request, dict) or not isinstance(request.get("images"), list):
        raise Refused(400, 'malformed request: expected {"images": [...], "prompts": [...], "metadata": [...]}')
    images, prompts, metadata = request["images"], request.get("prompts"), request.get("metadata")
    if len(images) > limits.max_images:
        raise Refused(
            413, f"{len(images)} images in a request; the server takes at most --max_images {limits.max_images}"
        )
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise Refused(400, "malformed request: prompts must be a list of strings")
    metadata = [{} for _ in prompts] if metadata is None else metadata
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise Refused(400, "malformed request: metadata must be a list of objects")
    if not len(images) == len(prompts) == len(metadata):
        raise Refused(400, f"malformed request: {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
    total = 0
    for index, text in enumerate(images):
        if not isinstance(text, str):
            raise Refused(400, f"malformed request: image {index} is not a base64 string")
        try:
            width, height = png_size(text)
        except ValueError as error:
            raise Refused(400, f"malformed request: image {index} is {error}") from error
        if width * height > limits.max_pixels:
            raise Refused(
                413,
                f"image {index} is {width}x{height} = {width * height} pixels; the server takes at most "
                f"--max_pixels {limits.max_pixels}",
            )
        total += width * height
        if total > limits.max_request_pixels:
            raise Refused(
                413,
                f"images 0-{index} hold {total} pixels together; the server takes at most --max_request_pixels "
                f"{limits.max_request_pixels} per request (send fewer images per request: the client's batch_size)",
            )
    return images, prompts, metadata


def _too_deep(value: object, limit: int) -> bool:
    """Whether ``value`` nests lists and dicts more than ``limit`` levels (iteratively: no recursion to exhaust)."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class RewardServer(ThreadingHTTPServer):
    """Serves one reward over the protocol of :mod:`rewards.remote`; ``server_address`` has the bound port.

    Args:
        reward: the reward to serve.
        name: its spec, reported by ``/health`` and in errors.
        host, port: where to listen (port 0 picks a free one).
        limits: see :class:`ServerLimits`.
        token: when given, every request must carry ``Authorization: Bearer <token>``.
    """

    daemon_threads = True

    def __init__(
        self,
        reward: Reward,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServerLimits | None = None,
        token: str | None = None,
    ) -> None:
        self.limits = limits or ServerLimits()
        self.request_queue_size = self.limits.backlog  # listen() reads it in super().__init__
        self.workers = threading.BoundedSemaphore(self.limits.workers)
        self.address_family = address_family(host)  # read when super().__init__ makes the socket
        super().__init__((host, port), _Handler)
        self.reward, self.name = reward, name
        self.expected_auth = f"Bearer {check_token(token, 'the server token')}".encode() if token else None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return base_url(*self.server_address[:2])

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        self.workers.acquire()  # every worker busy: stop accepting, so the next clients wait in the backlog
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.workers.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.workers.release()


def client_gone(connection: socket.socket) -> bool:
    """Whether the peer closed ``connection`` (read without consuming: a waiting client has nothing more to send,
    one that gave up has sent its FIN)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)  # recv would wait out the socket's timeout
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # reset by the peer
        return True


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        limits, self.connected = self.server.limits, time.monotonic()
        deadline = self.connected + min(limits.header_timeout, limits.read_timeout)  # until the headers are in
        self.reader = DeadlineReader(self.connection, deadline)
        self.rfile = io.BufferedReader(self.reader)

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/health":
            limits = dataclasses.asdict(self.server.limits)
            self._send(200, {"status": "ok", "reward": self.server.name, "limits": limits})
        else:
            self._send(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/score":
            self._refuse(404, f"unknown path {self.path!r}; use POST /score or GET /health")
            return
        try:
            length = self._content_length()
        except Refused as refused:
            self._refuse(refused.status, str(refused))
            return
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self._send(
                408, {"error": f"the request took longer than --read_timeout {self.server.limits.read_timeout} s"}
            )
            return
        if len(raw) < length:  # the client went away mid-body
            return
        try:
            images, prompts, metadata = parse_request(raw, self.server.limits)
        except Refused as refused:
            self._send(refused.status, {"error": str(refused)})
            return
        del raw
        answer = self._score(images, prompts, metadata)
        if answer is not None:
            self._send(*answer)

    def _score(self, encoded: list[str], prompts: list[str], metadata: list[dict]) -> tuple[int, dict] | None:
        """The answer to a scoring request, or None when its client left while it waited for the reward."""
        name = self.server.name
        with self.server.lock:  # decoding too, so one request's pixels are in memory at a time
            if client_gone(self.connection):  # it timed out and retried: scoring it would only delay the retry
                logger.info("skipped a request from %s: its client closed the connection", self.client_address[0])
                return None
            try:
                images = decode_images(encoded)
            except ValueError as error:
                return 400, {"error": f"malformed request ({error})"}
            try:
                with torch.no_grad():
                    scores = check_scores(name, self.server.reward(images, prompts, metadata), len(images))
            except Exception as error:
                logger.exception("reward %s failed", name)
                return 500, {"error": f"reward {name!r} raised {type(error).__name__}: {error}"}
        return 200, {"scores": {key: value.tolist() for key, value in scores.items()}}

    def _content_length(self) -> int:
        text = self.headers.get("Content-Length")
        if text is None or self.headers.get("Transfer-Encoding"):
            raise Refused(411, "send the body with a Content-Length header (chunked bodies are not accepted)")
        if not (text.isascii() and text.isdigit()):
            raise Refused(400, f"Content-Length must be a non-negative integer, got {text!r}")
        length = int(text)
        if length > self.server.limits.max_body_bytes:
            raise Refused(
                413,
                f"a body of {length} bytes; the server takes at most {self.server.limits.max_body_bytes} "
                "(--max_body_mb)",
            )
        return length

    def _authorised(self) -> bool:
        """Called first by every request, its headers read: the body may take the rest of ``read_timeout``."""
        self.reader.deadline = self.connected + self.server.limits.read_timeout
        expected = self.server.expected_auth
        if expected is None:
            return True
        sent = self.headers.get("Authorization", "").encode("latin-1", "replace")
        if hmac.compare_digest(sent, expected):
            return True
        # a stranger's body is discarded for a moment only, so strangers cannot hold the workers for read_timeout
        self.reader.deadline = min(self.reader.deadline, time.monotonic() + UNAUTHORISED_DRAIN_S)
        self._refuse(401, "missing or wrong token: send 'Authorization: Bearer <the server's token>'")
        return False

    def _refuse(self, status: int, message: str) -> None:
        """Answer before reading the body, then discard what the client still sends until it closes (or the
        read deadline): closing with unread data would reset the connection and lose the answer."""
        self._send(status, {"error": message})
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while self.rfile.read1(65536):
                pass
        except OSError:  # the deadline passed (TimeoutError) or the client reset: nothing more to do
            pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        try:
            self.connection.settimeout(self.server.limits.read_timeout)  # the read deadline may have left little
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timed out) before the answer: nothing to tell it
            logger.warning("reward server: client went away before the answer")

    def log_message(self, format: str, *args) -> None:
        logger.debug("reward server: " + format, *args)


def make_server(
    reward: Reward,
    name: str = "reward",
    host: str = "127.0.0.1",
    port: int = 0,
    limits: ServerLimits | None = None,
    token: str | None = None,
) -> RewardServer:
    """A server for ``reward`` bound to ``host:port`` (0 = a free port); call ``serve_forever()`` to run it."""
    return RewardServer(reward, name, host, port, limits, token)
