"""The reward server and its client facing hostile or broken peers: the fault sweep's second table.

Server cases send what a careless or hostile client sends to ``launch/reward_server.py``, run in its own process
as a user would (a token, 1 MiB bodies, 8 images, a 3 s read timeout, 4 workers), and are judged as
``bench/fault_sweep.py`` judges the trainer:

- ``clear error``: the expected 4xx status and a JSON error naming the limit or the fix (or, for the client, an
  error naming the URL and the cause within a bounded time);
- ``handled``: the valid requests around the fault are answered (50 at once, beside slow clients);
- ``unclear error``: refused, but with another status or a message naming nothing;
- ``silent misbehaviour``: accepted, or the client waited past its bound;
- ``work lost``: the server stopped answering valid requests after the fault.

Client cases run the remote reward client (``rewards/remote.py``) against stub servers on loopback: one that
trickles its answer, one that drops every request, one that never answers, and hostile ones answering JSON
nested past Python's recursion limit, 4 GiB (announced or not), NaN scores, an HTML page or HTTP 500. The helpers are shared with
``tests/rewards/test_reward_server_limits.py``, which holds each case with tighter assertions.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from rewards.base import RewardError
from rewards.compose import build_reward_set
from rewards.remote import RemoteReward, RemoteRewardError, encode_images
from rewards.server import PNG_SIGNATURE, base_url

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sweep-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AUTH_LINE = f"Authorization: Bearer {TOKEN}\r\n".encode()  # the same, in a raw request
SERVER_LIMITS = [
    "--max_body_mb", "1", "--max_images", "8", "--max_request_pixels", str(4 * 2048 * 2048), "--read_timeout", "3",
    "--workers", "4",
]  # fmt: skip
BOMB_SIDE = 12000  # 144 M pixels: below PIL's own bomb error (179 M), so only the server's limit stops it


def png_bomb(side: int) -> bytes:
    """A valid PNG of ``side`` x ``side`` black pixels: 420 KB for 12000, decoding to 432 MB (1.7 GB as floats)."""
    compressor = zlib.compressobj(9)
    rows = bytes(1 + 3 * side) * 100  # filter byte 0, then black RGB; 100 rows a call
    data = b"".join([compressor.compress(rows) for _ in range(side // 100)] + [compressor.flush()])

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def post(url: str, body: bytes, headers: dict | None = None, path: str = "/score") -> tuple[int, dict]:
    """POST through http.client (no retries): status and the JSON answer."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_exchange(url: str, request: bytes) -> tuple[int, dict]:
    """Send bytes as they are and read the answer until the server closes: status and JSON body."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def score_body(images: torch.Tensor) -> bytes:
    """A valid ``/score`` request for ``images``."""
    prompts = [f"p{i}" for i in range(len(images))]
    return json.dumps({"images": encode_images(images), "prompts": prompts}).encode()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


@contextlib.contextmanager
def script_server(reward: str = "jpeg_incompressibility", token: str = TOKEN) -> Iterator[tuple[str, int]]:
    """``launch/reward_server.py`` with a token and small limits, in its own process: ``(url, pid)``."""
    command = [sys.executable, str(ROOT / "launch" / "reward_server.py"), "--reward", reward, "--port", "0"]
    env = {**os.environ, "REWARD_SERVER_TOKEN": token}
    process = subprocess.Popen(
        [*command, *SERVER_LIMITS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        line = process.stdout.readline()
        if not line.startswith(f"serving {reward} on http://127.0.0.1:"):
            raise RuntimeError(f"the reward server did not start: {line!r}")
        yield line.split()[-1], process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def served_in_thread(server: ThreadingHTTPServer) -> Iterator[str]:
    """``server`` serving in a thread while the block runs: its base URL; shut down and closed after."""
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield base_url(*server.server_address[:2])
    finally:
        server.shutdown()
        server.server_close()


def stub_server(handler: type[BaseHTTPRequestHandler]) -> contextlib.AbstractContextManager[str]:
    """A plain HTTP server with ``handler`` on a loopback port, in a thread: its base URL."""
    return served_in_thread(ThreadingHTTPServer(("127.0.0.1", 0), handler))


def trickling(interval: float) -> type[BaseHTTPRequestHandler]:
    """A handler that reads the request, then sends a valid answer one byte every ``interval`` seconds."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"scores": {"score": [0.0] * 2}}).encode()
            answer = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            try:
                for byte in answer:
                    self.wfile.write(bytes([byte]))
                    time.sleep(interval)
            except OSError:  # the client hung up: what a deadline does
                pass

        def log_message(self, *args):
            pass

    return Handler


def send_json(handler: BaseHTTPRequestHandler, status: int, answer: dict) -> None:
    """Answer ``handler``'s request with ``status`` and ``answer`` as JSON."""
    body = json.dumps(answer).encode()
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def dying(posts: list) -> type[BaseHTTPRequestHandler]:
    """A server that passes its health check, then drops every POST without an answer (and counts them)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            send_json(self, 200, {"status": "ok", "reward": "dying"})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(1)

        def log_message(self, *args):
            pass

    return Handler


def flaky(posts: list, every: int) -> type[BaseHTTPRequestHandler]:
    """A server that passes its health check, then answers every ``every``-th POST with HTTP 503 and the others
    with a score of 0.5 per image (an overloaded proxy in front of a healthy reward); ``posts`` gets each status."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            send_json(self, 200, {"status": "ok", "reward": "flaky"})

        def do_POST(self):
            count = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["images"])
            with lock:
                posts.append(503 if (len(posts) + 1) % every == 0 else 200)
                status = posts[-1]
            send_json(self, status, {"scores": {"score": [0.5] * count}} if status == 200 else {"error": "busy"})

        def log_message(self, *args):
            pass

    return Handler


def hostile(status: int, body: bytes, announced: int | None = None) -> type[BaseHTTPRequestHandler]:
    """A server that passes its health check, then answers every POST with ``status`` and ``body``; ``announced``
    bytes of zeros instead, when given (announced in Content-Length, or with ``announced < 0`` sent unannounced
    until the client hangs up)."""

    class Handler(BaseHTTPRequestHandler):
        do_GET = dying([]).do_GET

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            if announced is None or announced > 0:
                self.send_header("Content-Length", str(len(body) if announced is None else announced))
            self.end_headers()
            try:
                if announced is None:
                    self.wfile.write(body)
                    return
                zeros = b"0" * 2**20
                for _ in range(abs(announced) // len(zeros)):
                    self.wfile.write(zeros)
            except OSError:  # the client hung up: what a bound on the answer does
                pass

        def log_message(self, *args):
            pass

    return Handler


@dataclasses.dataclass
class NetCase:
    """One fault against the server (``run(url, pid)``) or the client (``run(None, None)``): returns the outcome
    and what the user reads; ``test`` holds it in CI."""

    name: str
    fault: str
    run: Callable[[str | None, int | None], tuple[str, str]]
    test: str
    server: bool = True


IMAGES = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
SERVER_TEST = "tests/rewards/test_reward_server_limits.py"


def refusal(status: int, answer: dict, expected_status: int, expected_text: str) -> tuple[str, str]:
    """Judge a refused request: the status and a JSON error naming ``expected_text``."""
    message = f"HTTP {status}: {answer.get('error', answer)}"
    if status == 200:
        return "silent misbehaviour", message
    return ("clear error" if status == expected_status and expected_text in message else "unclear error"), message


def _post_case(body: Callable[[], bytes], status: int, text: str, headers: dict | None = AUTH):
    def run(url: str, pid: int) -> tuple[str, str]:
        return refusal(*post(url, body(), headers), status, text)

    return run


def _raw_case(request: bytes, status: int, text: str):
    def run(url: str, pid: int) -> tuple[str, str]:
        return refusal(*raw_exchange(url, request), status, text)

    return run


def _bomb(url: str, pid: int) -> tuple[str, str]:
    body = json.dumps({"images": [base64.b64encode(png_bomb(BOMB_SIDE)).decode()], "prompts": ["p"]}).encode()
    before = peak_rss_mb(pid)
    outcome, message = refusal(*post(url, body, AUTH), 413, "--max_pixels")
    grew = peak_rss_mb(pid) - before
    return (outcome if grew < 200 else "silent misbehaviour"), f"{message} (peak memory +{grew:.0f} MB)"


def _slow_clients(url: str, pid: int) -> tuple[str, str]:
    """Four half-sent requests hold every worker: each must be dropped at the read timeout (3 s) with a 408,
    and a valid request sent meanwhile answered once a worker frees."""
    parts = urllib.parse.urlsplit(url)
    answers: list[bytes] = []

    def slow() -> None:
        opening = b"POST /score HTTP/1.0\r\n" + AUTH_LINE + b"Content-Length: 99\r\n\r\n{"
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(opening)
            answers.append(sock.recv(65536))

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    start = time.perf_counter()
    status, _ = post(url, score_body(IMAGES[:2]), AUTH)
    waited = time.perf_counter() - start
    for thread in threads:
        thread.join(timeout=15)
    told = sum(b" 408 " in a for a in answers)
    message = f"valid request: HTTP {status} after {waited:.1f} s; {told} of 4 slow clients told 408 and dropped"
    return ("handled" if status == 200 and told == 4 and waited < 6 else "silent misbehaviour"), message


def concurrent_clients(
    url: str, images: torch.Tensor, headers: dict | None = None, count: int = 50
) -> tuple[list, float]:
    """``count`` remote clients released at once, client i scoring image ``i % len(images)`` with no retry (a reset
    connection shows): per client its scores or the exception, and the seconds until every one was done."""
    barrier, results = threading.Barrier(count), [None] * count

    def client(index: int) -> None:
        remote = RemoteReward(url, batch_size=8, timeout=30, retries=0, headers=headers)
        barrier.wait()
        try:
            results[index] = remote(images[index % len(images)][None], ["p"], [{}])["score"]
        except Exception as error:  # a reset connection, a timeout: that client was not served
            results[index] = error

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, time.perf_counter() - start


def _fifty_clients(url: str, pid: int) -> tuple[str, str]:
    results, seconds = concurrent_clients(url, IMAGES, AUTH)
    answered = sum(isinstance(r, torch.Tensor) and r.shape == (1,) for r in results)
    message = f"{answered} of 50 concurrent clients answered in {seconds:.1f} s"
    return ("handled" if answered == 50 else "silent misbehaviour"), message


def _client_error(call: Callable[[], object], expected: str, bound: float) -> tuple[str, str]:
    """Judge a client call that must fail: an error naming ``expected`` within ``bound`` seconds."""
    start = time.perf_counter()
    try:
        call()
    except (RemoteRewardError, RewardError) as error:
        seconds = time.perf_counter() - start
        message = f"{type(error).__name__} after {seconds:.1f} s: {error}"
        if seconds > bound:
            return "silent misbehaviour", message
        return ("clear error" if expected in str(error) else "unclear error"), message
    return "silent misbehaviour", "no error"


def _trickling_server(url: None, pid: None) -> tuple[str, str]:
    with stub_server(trickling(0.1)) as stub:  # the whole answer takes 8 s
        remote = RemoteReward(stub, timeout=1.0, retries=0)
        return _client_error(lambda: remote(IMAGES[:2], ["a", "b"], [{}, {}]), "no answer within timeout=1.0 s", 2)


def _hostile_answer(handler: type[BaseHTTPRequestHandler], expected: str):
    """A client case: the remote reward, through the reward set as the trainer calls it, against ``handler``."""

    def run(url: None, pid: None) -> tuple[str, str]:
        with stub_server(handler) as stub:
            rewards = build_reward_set("remote", kwargs={"remote": {"url": stub, "timeout": 5.0, "retries": 0}})
            return _client_error(lambda: rewards(IMAGES[:2], ["a", "b"], [{}, {}]), expected, 5)

    return run


def _hung_server(url: None, pid: None) -> tuple[str, str]:
    with socket.socket() as hung:  # listening, never accepting: connects, and no answer ever comes
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        stub = f"http://127.0.0.1:{hung.getsockname()[1]}"
        return _client_error(lambda: RemoteReward(stub, timeout=1.0).check_health(), "failed its health check", 2)


def _dead_server_drop_group(url: None, pid: None) -> tuple[str, str]:
    """A server that dies after its health check, under drop_group with 8 groups and 1 retry: the step's groups
    are dropped after 2 attempts in all (not 2 per group), and the third lost step stops the run."""
    posts: list = []
    with stub_server(dying(posts)) as stub:
        remote = {"url": stub, "retries": 1, "backoff": 0.1}
        rewards = build_reward_set("remote", kwargs={"remote": remote}, failure_policy="drop_group")
        prompts, groups = [f"p{i}" for i in range(8)], torch.arange(8)
        for _ in range(2):
            rewards(IMAGES, prompts, [{}] * 8, group_ids=groups)
        outcome, message = _client_error(lambda: rewards(IMAGES, prompts, [{}] * 8, group_ids=groups), "in a row", 5)
    if len(posts) != 6:
        return "silent misbehaviour", f"{len(posts)} requests for 3 steps of 8 groups: {message}"
    return outcome, f"{message} (2 requests per step of 8 groups)"


NET_CASES = [
    NetCase("server_decompression_bomb", "a 420 KB PNG that decodes to 144 M pixels", _bomb, SERVER_TEST),
    NetCase("server_oversized_body", "a 2 MiB body (limit 1 MiB)",
            _post_case(lambda: b"x" * 2**21, 413, "--max_body_mb"), SERVER_TEST),
    NetCase("server_huge_content_length", "a Content-Length of 10 GB, no body sent",
            _raw_case(b"POST /score HTTP/1.0\r\n" + AUTH_LINE + b"Content-Length: 10000000000\r\n\r\n", 413,
                      "--max_body_mb"), SERVER_TEST),
    NetCase("server_negative_content_length", "Content-Length: -1",
            _raw_case(b"POST /score HTTP/1.0\r\n" + AUTH_LINE + b"Content-Length: -1\r\n\r\n", 400,
                      "non-negative integer"), SERVER_TEST),
    NetCase("server_no_content_length", "a POST without Content-Length",
            _raw_case(b"POST /score HTTP/1.0\r\n" + AUTH_LINE + b"\r\n", 411, "Content-Length"), SERVER_TEST),
    NetCase("server_deep_json", "JSON nested 100,000 deep",
            _post_case(lambda: b"[" * 100_000 + b"]" * 100_000, 400, "--max_json_depth"), SERVER_TEST),
    NetCase("server_not_json", "a body that is not JSON",
            _post_case(lambda: b"{images: oops", 400, "not JSON"), "tests/rewards/test_remote.py"),
    NetCase("server_too_many_images", "9 images in one request (limit 8)",
            _post_case(lambda: score_body(torch.zeros(9, 3, 4, 4)), 413, "--max_images 8"), SERVER_TEST),
    NetCase("server_many_large_images", "5 plain 2048x2048 PNGs in a 60 KB request (limit 4 x 2048^2 pixels)",
            _post_case(lambda: json.dumps({"images": [base64.b64encode(png_bomb(2048)).decode()] * 5,
                                           "prompts": ["p"] * 5}).encode(), 413, "--max_request_pixels"), SERVER_TEST),
    NetCase("server_not_png", "an image that is a GIF, not a PNG",
            _post_case(lambda: json.dumps({"images": [base64.b64encode(b"GIF89a" * 8).decode()],
                                           "prompts": ["p"]}).encode(), 400, "not a PNG"), SERVER_TEST),
    NetCase("server_mismatched_lengths", "2 images and 1 prompt",
            _post_case(lambda: json.dumps({"images": encode_images(IMAGES[:2]), "prompts": ["p"]}).encode(), 400,
                       "2 images, 1 prompts"), "tests/rewards/test_remote.py"),
    NetCase("server_no_token", "a request without the token",
            _post_case(lambda: score_body(IMAGES[:2]), 401, "token", headers=None), SERVER_TEST),
    NetCase("server_wrong_token", "a request with a wrong token",
            _post_case(lambda: score_body(IMAGES[:2]), 401, "token", headers={"Authorization": "Bearer wrong"}),
            SERVER_TEST),
    NetCase("server_unknown_path", "a POST to /predict",
            lambda url, pid: refusal(*post(url, score_body(IMAGES[:1]), AUTH, path="/predict"), 404, "/score"),
            "tests/rewards/test_remote.py"),
    NetCase("server_slow_clients", "4 half-sent requests holding every worker", _slow_clients, SERVER_TEST),
    NetCase("server_fifty_clients", "50 clients at once (4 workers)", _fifty_clients, SERVER_TEST),
    NetCase("client_trickling_server", "a server answering one byte every 0.1 s (client timeout 1 s)",
            _trickling_server, SERVER_TEST, server=False),
    NetCase("client_deep_json_answer", "a server answering JSON nested 100,000 deep",
            _hostile_answer(hostile(200, b"[" * 100_000 + b"]" * 100_000), "nested too deep"), SERVER_TEST,
            server=False),
    NetCase("client_huge_answer", "a server announcing a 4 GiB answer",
            _hostile_answer(hostile(200, b"", announced=2**32), "4294967296 bytes (its Content-Length)"), SERVER_TEST,
            server=False),
    NetCase("client_unannounced_huge_answer", "a server streaming 4 GiB with no Content-Length",
            _hostile_answer(hostile(200, b"", announced=-(2**32)), "unannounced length"), SERVER_TEST, server=False),
    NetCase("client_nan_answer", "a server answering NaN and infinite scores",
            _hostile_answer(hostile(200, b'{"scores": {"score": [NaN, 1e999]}}'), "non-finite"),
            "tests/rewards/test_compose.py",
            server=False),
    NetCase("client_html_answer", "a URL answering an HTML page (a proxy's login page)",
            _hostile_answer(hostile(200, b"<html>sign in</html>"), "not JSON"), "tests/rewards/test_remote.py",
            server=False),
    NetCase("client_http_500", "a server answering HTTP 500",
            _hostile_answer(hostile(500, b'{"error": "CUDA out of memory"}'), "CUDA out of memory"),
            "tests/rewards/test_remote.py", server=False),
    NetCase("client_hung_server", "a server that accepts and never answers, at the health check",
            _hung_server, SERVER_TEST, server=False),
    NetCase("client_dead_server_drop_group", "a server dying after its health check, under drop_group",
            _dead_server_drop_group, SERVER_TEST, server=False),
]  # fmt: skip


def healthy(url: str) -> bool:
    """The server still answers a valid request."""
    try:
        return post(url, score_body(IMAGES[:2]), AUTH)[0] == 200
    except OSError:
        return False


def net_sweep(cases: list[NetCase]) -> list[dict]:
    """Run the server cases against one ``launch/reward_server.py`` (a fresh one after a case that downs it),
    then the client cases; rows as ``bench/fault_sweep.py`` writes them."""
    rows = []
    server_cases = [c for c in cases if c.server]
    with contextlib.ExitStack() as stack:
        url, pid = stack.enter_context(script_server()) if server_cases else (None, None)
        for case in cases:
            if not case.server:
                outcome, message = case.run(None, None)
            else:
                outcome, message = case.run(url, pid)
                if not healthy(url):
                    outcome, message = "work lost", f"the server stopped answering: {message}"
                    stack.close()
                    url, pid = stack.enter_context(script_server())
            row = {"case": case.name, "fault": case.fault, "outcome": outcome, "test": case.test, "exit": None}
            rows.append(row | {"message": message[:300]})  # its opening names the cause
            print(f"{case.name}: {outcome} {message[:160]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """This module holds cases; the sweep runs them. ``--help`` says how."""
    import argparse

    names = ",".join(case.name for case in NET_CASES)
    parser = argparse.ArgumentParser(
        description="The reward server's and client's cases of the fault sweep (this file's docstring says how they "
        f"are judged). Run them alone with:\n\n  python bench/fault_sweep.py --only {names}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    print(f"python bench/fault_sweep.py --only {names}")


if __name__ == "__main__":
    main()
