"""Remote rewards: a real server on 127.0.0.1, scoring equal to local, and the four faults (slow, down,
malformed, failing) each ending in an error that names the server, what happened and what to do."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from rewards.base import load_reward
from rewards.compose import build_reward_set
from rewards.remote import RemoteReward, RemoteRewardError, decode_images, encode_images

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"prompt {i}" for i in range(6)]
METADATA = [{"index": i} for i in range(6)]


class Brightness:
    """Two scores, one depending on metadata, and a record of every batch it was called with."""

    def __init__(self):
        self.batches = []

    def __call__(self, images, prompts, metadata):
        self.batches.append(len(images))
        return {"score": images.mean(dim=(1, 2, 3)), "index": torch.tensor([float(m["index"]) for m in metadata])}


def canned(status: int, body: bytes, counter: list | None = None) -> type[BaseHTTPRequestHandler]:
    """A handler answering every POST with ``status`` and ``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if counter is not None:
                counter.append(1)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


def test_png_round_trip_is_exact(images):
    assert torch.equal(decode_images(encode_images(images)), images)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc")
def test_decoding_holds_the_float_batch_and_one_image_at_a_time():
    """16 plain 2048x2048 PNGs (16 KB each as base64) decode into one float tensor (768 MiB) with one image's
    working copies beside it, not several copies of the batch (28 bytes a pixel before)."""
    script = """
import base64, io
import torch
from PIL import Image
from rewards.remote import decode_images
def mib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) / 1024
buffer = io.BytesIO()
Image.new("RGB", (2048, 2048), (200, 10, 10)).save(buffer, format="PNG")
encoded = [base64.b64encode(buffer.getvalue()).decode()] * 16
before = mib("VmRSS")
batch = decode_images(encoded)
print(mib("VmHWM") - before)
assert batch.shape == (16, 3, 2048, 2048) and torch.equal(batch[:, 0, ::8].unique(), torch.tensor([200.0]) / 255)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert 768 <= float(out.stdout) < 768 + 64


def test_remote_scores_equal_local_scores(serve, images):
    served = Brightness()
    url = serve(served)
    remote = load_reward("remote", url=url, batch_size=4)
    scores = remote(images, PROMPTS, METADATA)
    local = Brightness()(images, PROMPTS, METADATA)
    assert list(scores) == ["score", "index"] and served.batches == [4, 2]
    assert all(torch.equal(scores[key], local[key]) for key in local)
    # through a reward set, as the trainer uses it; "<url>/score" is accepted as the URL too
    rewards = build_reward_set("remote", kwargs={"remote": {"url": url + "/score"}})
    assert torch.equal(rewards(images, PROMPTS, METADATA).total, local["score"])


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")
def test_a_server_on_the_ipv6_loopback_serves(images):
    """`--host ::1` (which the launcher counts as local) binds an IPv6 socket and the client reaches it."""
    from bench.server_faults import served_in_thread
    from rewards.server import make_server

    server = make_server(Brightness(), "test", host="::1")
    assert server.url.startswith("http://[::1]:")
    with served_in_thread(server) as url:
        scores = load_reward("remote", url=url, batch_size=4)(images, PROMPTS, METADATA)
    assert torch.equal(scores["score"], Brightness()(images, PROMPTS, METADATA)["score"])


def test_remote_nan_reaches_the_failure_policy(serve, images):
    url = serve(lambda images, prompts, metadata: {"score": torch.tensor([1.0, math.nan] * (len(images) // 2))})
    rewards = build_reward_set("remote", kwargs={"remote": {"url": url}}, failure_policy="drop_group")
    result = rewards(images, PROMPTS, METADATA, group_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    assert not result.valid.any() and result.dropped_groups == 3


def test_slow_server_times_out(serve, images):
    release = threading.Event()

    def slow(images, prompts, metadata):
        release.wait(10)
        return {"score": torch.zeros(len(images))}

    remote = RemoteReward(serve(slow), timeout=0.3, retries=1, backoff=0.05)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"failed on all 2 attempts.*no answer within timeout=0.3 s") as error:
        remote(images, PROMPTS, METADATA)
    assert time.perf_counter() - start < 3
    assert "raise the remote reward's timeout" in str(error.value)
    release.set()


def test_server_down_retries_then_fails(images):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.1)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"127.0.0.1:{port} failed on all 3 attempts.*cannot connect") as error:
        remote(images, PROMPTS, METADATA)
    assert time.perf_counter() - start >= 0.3  # backoff 0.1 s, then 0.2 s
    assert "Is the server running" in str(error.value) and "launch/reward_server.py" in str(error.value)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>gateway</html>", "malformed answer .not JSON"),
        (json.dumps({"result": [1, 2]}).encode(), "malformed answer"),
        (json.dumps({"scores": {"score": [1.0, 2.0]}}).encode(), r"shape \(2,\) for a batch of 6"),
        (json.dumps({"scores": {"score": ["a"] * 6}}).encode(), "not numeric"),
    ],
)
def test_malformed_response(serve, images, body, match):
    remote = RemoteReward(serve(handler=canned(200, body)), retries=0)
    with pytest.raises(RemoteRewardError, match=match) as error:
        remote(images, PROMPTS, METADATA)
    assert "remote reward at http://127.0.0.1" in str(error.value)


def test_reward_failing_on_the_server_is_not_retried(serve, images):
    def broken(images, prompts, metadata):
        raise ValueError("weights missing")

    remote = RemoteReward(serve(broken), retries=3, backoff=5)
    with pytest.raises(RemoteRewardError, match="answered HTTP 500: reward 'test' raised ValueError: weights missing"):
        remote(images, PROMPTS, METADATA)  # would take 35 s if it retried


def test_overloaded_server_is_retried(serve, images):
    calls = []
    remote = RemoteReward(serve(handler=canned(503, b'{"error": "busy"}', calls)), retries=2, backoff=0.01)
    with pytest.raises(RemoteRewardError, match="failed on all 3 attempts.*HTTP 503: busy"):
        remote(images, PROMPTS, METADATA)
    assert len(calls) == 3


def test_server_rejects_bad_requests(serve):
    url = serve(Brightness())
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["reward"] == "test" and health["limits"]["max_images"] == 64
    request = urllib.request.Request(url + "/score", data=b'{"images": ["not base64!"], "prompts": ["p"]}')
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 400 and "malformed request" in json.loads(error.value.read())["error"]


def test_launch_script_serves_a_builtin(images):
    command = [sys.executable, str(ROOT / "launch" / "reward_server.py"), "--reward", "jpeg_incompressibility"]
    process = subprocess.Popen(
        [*command, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving jpeg_incompressibility on http://127.0.0.1:"), line
        remote = RemoteReward(line.split()[-1], timeout=30)
        local = load_reward("jpeg_incompressibility")(images, PROMPTS, METADATA)
        assert torch.equal(remote(images, PROMPTS, METADATA)["score"], local["score"])
    finally:
        process.terminate()
        process.wait(timeout=10)
