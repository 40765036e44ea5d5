"""The reward server facing a network, and the client bounding what it waits for (loopback only).

A load test bounded in count and time: 50 concurrent clients, a decompression bomb, oversized and malformed
bodies, slow clients and tokens against the server, which answers the valid requests throughout with its memory
bounded; a trickling server, a hung one and a dead one against the client, each failing in a bounded time.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from bench.server_faults import (
    AUTH,
    AUTH_LINE,
    BOMB_SIDE,
    TOKEN,
    concurrent_clients,
    dying,
    flaky,
    hostile,
    peak_rss_mb,
    png_bomb,
    post,
    raw_exchange,
    score_body,
    trickling,
)
from bench.server_faults import script_server as start_script_server
from rewards.base import RewardError
from rewards.compose import RewardSet, build_reward_set
from rewards.remote import RemoteReward, RemoteRewardError
from rewards.server import ServerLimits
from rl.user_errors import run_cli

ROOT = Path(__file__).resolve().parents[2]


def mean_reward(images, prompts, metadata):
    return {"score": images.mean(dim=(1, 2, 3))}


@pytest.fixture(scope="module")
def script_server():
    """``launch/reward_server.py`` with a token and small limits (1 MiB, 8 images, 3 s, 4 workers): ``(url, pid)``."""
    with start_script_server() as server:
        yield server


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_decompression_bomb_is_refused_from_its_header(script_server, images):
    url, pid = script_server
    assert post(url, score_body(images[:2]), AUTH)[0] == 200  # warm: what a valid request costs is in the peak
    bomb = png_bomb(BOMB_SIDE)
    assert Image.open(io.BytesIO(bomb)).size == (BOMB_SIDE, BOMB_SIDE)  # a real, decodable PNG
    body = json.dumps({"images": [base64.b64encode(bomb).decode()], "prompts": ["p"]}).encode()
    assert len(body) < 2**20  # under the body limit: only the pixel limit stands between it and 2 GB
    before = peak_rss_mb(pid)
    start = time.perf_counter()
    status, answer = post(url, body, AUTH)
    assert status == 413 and f"image 0 is {BOMB_SIDE}x{BOMB_SIDE} = 144000000 pixels" in answer["error"]
    assert "--max_pixels 4194304" in answer["error"]
    assert time.perf_counter() - start < 5
    assert peak_rss_mb(pid) - before < 200
    assert post(url, score_body(images[:2]), AUTH)[0] == 200  # still serving


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_many_large_images_within_each_images_limit_are_bounded_together(script_server, images):
    """Images that pass the per-image limit one by one are bounded together (``--max_request_pixels``, 4 x
    2048x2048 here); a request at that bound is scored with memory near its float pixels (12 bytes each)."""
    url, pid = script_server
    large = base64.b64encode(png_bomb(2048)).decode()
    body = json.dumps({"images": [large] * 5, "prompts": ["p"] * 5}).encode()
    assert len(body) < 2**20  # under the body limit
    before = peak_rss_mb(pid)
    status, answer = post(url, body, AUTH)
    assert status == 413 and "images 0-4 hold 20971520 pixels together" in answer["error"]
    assert "--max_request_pixels 16777216" in answer["error"]
    assert peak_rss_mb(pid) - before < 50
    status, answer = post(url, json.dumps({"images": [large] * 4, "prompts": ["p"] * 4}).encode(), AUTH)
    assert status == 200 and len(answer["scores"]["score"]) == 4
    # the decoded floats (12 bytes a pixel) and the JPEG reward's own copies: bounded by the request's pixels
    assert peak_rss_mb(pid) - before < 40 * 4 * 2048 * 2048 / 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_a_body_of_tiny_json_items_is_refused_before_it_is_parsed(script_server, images):
    """``[{},{},...]`` costs 20-30x its size as Python objects: counted (299,999 commas between the items, 2 more
    and 3 colons around them), not parsed."""
    url, pid = script_server
    before = peak_rss_mb(pid)
    body = b'{"images": [], "prompts": [], "metadata": [' + b",".join([b"{}"] * 300_000) + b"]}"
    assert len(body) < 2**20  # under the body limit
    status, answer = post(url, body, AUTH)
    assert status == 413 and "a JSON body of 300004 items (commas and colons)" in answer["error"]
    assert "the server takes at most --max_json_items 65536" in answer["error"]
    assert peak_rss_mb(pid) - before < 10  # parsed, it would take ~20 MB
    assert post(url, score_body(images[:2]), AUTH)[0] == 200  # still serving


def test_oversized_and_malformed_bodies_are_refused(script_server, images):
    url, _ = script_server
    status, answer = post(url, b"x" * (2 * 2**20), AUTH)  # sent whole: the server discards it and answers
    assert status == 413 and "a body of 2097152 bytes; the server takes at most 1048576" in answer["error"]
    start = time.perf_counter()  # a 10 GB claim is refused from the header, without waiting for a byte of it
    status, answer = raw_exchange(url, b"POST /score HTTP/1.0\r\n" + AUTH_LINE + b"Content-Length: 10000000000\r\n\r\n")
    assert status == 413 and time.perf_counter() - start < 2
    assert raw_exchange(url, b"POST /score HTTP/1.0\r\n" + AUTH_LINE + b"\r\n")[0] == 411
    for length in (b"-1", b"abc", b"1e3"):
        status, answer = raw_exchange(
            url, b"POST /score HTTP/1.0\r\n" + AUTH_LINE + b"Content-Length: " + length + b"\r\n\r\n"
        )
        assert status == 400 and "Content-Length must be a non-negative integer" in answer["error"]
    status, answer = post(url, b"[" * 100_000 + b"]" * 100_000, AUTH)
    assert status == 400 and "--max_json_depth 32" in answer["error"]
    nested = {"images": [], "prompts": [], "metadata": [{"a": json.loads("[" * 40 + "]" * 40)}]}
    assert post(url, json.dumps(nested).encode(), AUTH) == (
        400,
        {"error": "JSON nested deeper than --max_json_depth 32"},
    )
    status, answer = post(url, score_body(torch.zeros(9, 3, 4, 4)), AUTH)
    assert status == 413 and "9 images in a request; the server takes at most --max_images 8" in answer["error"]
    status, answer = post(
        url, json.dumps({"images": [base64.b64encode(b"GIF89a" * 8).decode()], "prompts": ["p"]}).encode(), AUTH
    )
    assert status == 400 and "image 0 is not a PNG" in answer["error"]
    assert post(url, score_body(images[:2]), AUTH)[0] == 200  # still serving


def test_a_token_is_required_when_the_server_has_one(script_server, images, monkeypatch):
    url, _ = script_server
    body = score_body(images[:2])
    assert post(url, body)[0] == 401
    assert post(url, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(url, body, {"Authorization": TOKEN})[0] == 401  # the token without "Bearer "
    assert post(url, body, AUTH)[0] == 200
    # a stranger announcing a body it never sends is answered and dropped within a second, not --read_timeout 3 s
    start = time.perf_counter()
    status, answer = raw_exchange(url, b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n")
    assert status == 401 and "missing or wrong token" in answer["error"] and time.perf_counter() - start < 2
    monkeypatch.delenv("REWARD_SERVER_TOKEN", raising=False)
    with pytest.raises(
        RemoteRewardError, match=rf"{url} failed its health check: HTTP 401.*REWARD_SERVER_TOKEN is not set"
    ):
        build_reward_set("remote", kwargs={"remote": {"url": url}})
    monkeypatch.setenv("MY_TOKEN", TOKEN)  # the client's token_env names the variable
    rewards = build_reward_set("remote", kwargs={"remote": {"url": url, "batch_size": 8, "token_env": "MY_TOKEN"}})
    assert rewards(images, [f"p{i}" for i in range(6)], [{}] * 6).valid.all()
    with pytest.raises(
        RemoteRewardError, match=r"at most 8 images per request .its --max_images., but batch_size is 64"
    ):
        RemoteReward(url, token_env="MY_TOKEN").check_health()


def test_fifty_concurrent_clients_are_all_answered(serve, images):
    url = serve(mean_reward)  # default limits: 8 workers, so 42 clients wait in the listen backlog
    results, seconds = concurrent_clients(url, images)
    assert [type(r).__name__ for r in results if not isinstance(r, torch.Tensor)] == []
    assert all(torch.allclose(results[i], images[i % 6].mean().reshape(1)) for i in range(50))
    assert seconds < 20


def test_slow_clients_are_dropped_while_valid_requests_are_served(serve, images):
    limits = ServerLimits(read_timeout=3.0, header_timeout=1.0, workers=3)
    url = serve(mean_reward, limits=limits)
    parts = urllib.parse.urlsplit(url)
    dropped: dict[str, tuple[float, bytes]] = {}

    def slow(name: str, opening: bytes, trickle: bytes) -> None:
        """Send ``opening``, then a byte of ``trickle`` every 0.1 s, until the server closes or answers."""
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(opening)
            sock.settimeout(0.1)
            for byte in trickle:
                try:
                    dropped[name] = (time.monotonic() - start, sock.recv(65536))
                    return
                except TimeoutError:
                    sock.sendall(bytes([byte]))
                except ConnectionError:
                    dropped[name] = (time.monotonic() - start, b"")
                    return

    half_headers = ("headers", b"POST /score HTTP/1.0\r\n", b"X" * 100)  # one header byte at a time, for 10 s
    half_body = ("body", b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{", b" " * 100)
    threads = [threading.Thread(target=slow, args=spec) for spec in (half_headers, half_body)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # both hold a worker now
    start = time.perf_counter()
    assert torch.allclose(
        RemoteReward(url, timeout=10, retries=0)(images[:2], ["a", "b"], [{}, {}])["score"],
        images[:2].mean(dim=(1, 2, 3)),
    )
    assert time.perf_counter() - start < 2.5  # answered while both slow clients are still held
    for thread in threads:
        thread.join(timeout=15)
    assert set(dropped) == {"headers", "body"}
    # dropped at header_timeout (1 s) and read_timeout (3 s), not after the 10 s of trickle
    assert 0.8 < dropped["headers"][0] < 2.5 and 2.5 < dropped["body"][0] < 5, dropped
    assert b" 408 " in dropped["body"][1]  # a half-sent body is told why


def test_client_deadline_bounds_a_trickling_server(serve, images):
    remote = RemoteReward(serve(handler=trickling(0.1)), timeout=1.0, retries=0)  # the answer takes 8 s in all
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"no answer within timeout=1.0 s"):
        remote(images[:2], ["a", "b"], [{}, {}])
    assert time.perf_counter() - start < 2  # not the 8 s the server takes to trickle its answer


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (hostile(200, b"[" * 100_000 + b"]" * 100_000), "not JSON: nested too deep"),  # was a RecursionError
        (hostile(200, b'{"scores": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deep"),
        (hostile(200, b"", announced=2**32), "an answer of 4294967296 bytes \\(its Content-Length\\)"),
        (hostile(200, b"", announced=-(2**32)), "an answer of unannounced length, more than the 16777216 bytes"),
    ],
    ids=["deep_json", "deep_json_in_scores", "huge_announced", "huge_unannounced"],
)
def test_a_hostile_answer_is_a_clear_error_in_bounded_memory_and_time(serve, images, handler, expected):
    """Before the bound the client read a 4 GiB answer whole (18 s on loopback) and raised a bare RecursionError
    on deep JSON; now each is a RemoteRewardError naming the URL, and is not retried."""
    url = serve(handler=handler)
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"{url} sent .*{expected}"):
        RemoteReward(url, timeout=30.0, retries=2, backoff=5.0)(images[:2], ["a", "b"], [{}, {}])
    assert time.perf_counter() - start < 3  # neither 4 GiB read nor a retry's 5 s backoff


def test_health_check_fails_fast_naming_the_url():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{free.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"{dead} failed its health check: cannot connect"):
        build_reward_set("remote", kwargs={"remote": {"url": dead}})
    with socket.socket() as hung:  # listening, never accepting: connects, and no answer ever comes
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with pytest.raises(RemoteRewardError, match=rf"{url} failed its health check: no answer within timeout=1.0"):
            RemoteReward(url, timeout=1.0).check_health()
    assert time.perf_counter() - start < 3


def test_dead_server_fails_a_step_once_under_drop_group(serve, images):
    posts: list = []
    remote = {"url": serve(handler=dying(posts)), "retries": 1, "backoff": 0.1}
    rewards = build_reward_set("remote", kwargs={"remote": remote}, failure_policy="drop_group")
    prompts, groups = [f"p{i}" for i in range(6)], torch.arange(6)  # six groups: 14 attempts when retried per group
    start = time.perf_counter()
    result = rewards(images, prompts, [{}] * 6, group_ids=groups)
    assert result.dropped_groups == 6 and not result.valid.any()
    assert len(posts) == 2  # one attempt and the one retry, for the whole step
    assert "given up on earlier in this step" in result.failures[-1]
    assert time.perf_counter() - start < 1.5
    rewards(images, prompts, [{}] * 6, group_ids=groups)
    assert len(posts) == 4  # the next step has its own budget
    with pytest.raises(RewardError, match="failed on every group of 3 batches in a row"):
        rewards(images, prompts, [{}] * 6, group_ids=groups)
    assert len(posts) == 6 and time.perf_counter() - start < 5


def test_a_failing_group_is_still_retried_alone(serve, images):
    calls = []

    def picky(images, prompts, metadata):
        calls.append(len(images))
        if "bad" in prompts:
            raise ValueError("cannot score 'bad'")
        return mean_reward(images, prompts, metadata)

    remote = RemoteReward(serve(picky), retries=2, backoff=5)  # a 500 is not retried: no backoff is slept
    rewards = RewardSet([("remote", remote, 1.0)], failure_policy="drop_group")
    result = rewards(images, ["a", "a", "bad", "bad", "c", "c"], [{}] * 6)
    assert calls == [6, 2, 2, 2] and result.dropped_groups == 1
    assert result.valid.tolist() == [True, True, False, False, True, True]


def test_a_training_step_of_several_batches_on_several_threads_has_one_retry_budget(serve, images):
    """What the trainer does: a step's chunks are submitted to the reward pool (two threads here) inside
    ``RewardSet.step()``. A dead server costs the step its retries plus one first attempt per request in flight
    (at most retries + threads), not a budget per chunk (8) or per group, and a step lost entirely counts once
    toward max_failed_batches, however many chunks it had."""
    posts: list = []
    remote = {"url": serve(handler=dying(posts)), "retries": 1, "backoff": 0.1}
    rewards = build_reward_set("remote", max_workers=2, kwargs={"remote": remote}, failure_policy="drop_group")
    prompts, groups = [f"p{i}" for i in range(6)], torch.arange(6)
    start = time.perf_counter()
    for _ in range(2):
        before = len(posts)
        with rewards.step():
            chunks = [rewards.submit(images, prompts, [{}] * 6, group_ids=groups) for _ in range(4)]
            results = [chunk.result() for chunk in chunks]
        assert all(r.dropped_groups == 6 for r in results)
        assert 2 <= len(posts) - before <= 3  # one retry for the step, on top of the first attempts in flight
    with pytest.raises(RewardError, match="failed on every group of 3 steps in a row"):
        with rewards.step():
            [rewards.submit(images, prompts, [{}] * 6, group_ids=groups).result() for _ in range(4)]
    assert len(posts) <= 9 and time.perf_counter() - start < 5
    rewards.close()


def test_a_server_that_now_and_then_fails_an_attempt_keeps_scoring_the_step(serve, images):
    """Retries that succeed give the step its budget back: only failures in a row give a server up (one that is
    down still costs one step: the test above)."""
    posts: list = []
    remote = {"url": serve(handler=flaky(posts, every=3)), "retries": 1, "backoff": 0.01}
    rewards = build_reward_set("remote", kwargs={"remote": remote}, failure_policy="drop_group")
    with rewards.step():
        results = [rewards.submit(images, [f"p{i}" for i in range(6)], [{}] * 6).result() for _ in range(12)]
    # every third POST failed, each retried once with success (before: the second 503 gave the server up, and
    # the step dropped every chunk from there on)
    assert (len(posts), posts.count(503)) == (17, 5) and all(r.dropped_groups == 0 for r in results)
    rewards.close()


def test_a_request_whose_client_gave_up_is_not_scored(serve, images):
    """A retry does not queue a second scoring of the same images behind the first: the server skips a request
    whose client closed the connection while it waited for the reward."""
    calls = []

    def slow(images, prompts, metadata):
        calls.append(prompts[0])
        time.sleep(0.5)
        return mean_reward(images, prompts, metadata)

    url = serve(slow)
    first = threading.Thread(target=RemoteReward(url, timeout=10), args=(images, ["first"] * 6, [{}] * 6))
    first.start()
    time.sleep(0.1)  # the first request holds the reward
    with pytest.raises(RemoteRewardError, match="no answer within timeout=0.2 s"):
        RemoteReward(url, timeout=0.2, retries=0)(images, ["second"] * 6, [{}] * 6)
    first.join()
    time.sleep(0.2)
    assert calls == ["first"]


def test_a_retry_schedule_longer_than_the_sets_wait_is_refused_when_the_set_is_built():
    remote = RemoteReward("http://127.0.0.1:9", timeout=300, retries=3)  # configs/flux_dev_geneval.yaml's old one
    assert remote.longest_request_s == 4 * 300 + 7
    with pytest.raises(ValueError, match=r"one request may take 1207 s .* longer than the 900 s .*reward_timeout_s"):
        RewardSet([("remote", remote, 1.0)], timeout_s=900)
    RewardSet([("remote", remote, 1.0)], timeout_s=0).close()  # no limit: nothing to outlive
    shipped = yaml.safe_load((ROOT / "configs" / "flux_dev_geneval.yaml").read_text())
    RewardSet([("remote", RemoteReward(**shipped["reward_kwargs"]["remote"]), 1.0)], timeout_s=900).close()


REFUSED_AT_STARTUP = [
    (["--workers", "0"], "--workers must be >= 1 (requests are served by that many threads), got 0"),
    (["--max_images", "0"], "--max_images must be >= 1 (a request of more images is refused), got 0"),
    (["--max_pixels", "-1"], "--max_pixels must be >= 1"),
    (["--max_request_pixels", "0"], "--max_request_pixels must be >= 1"),
    (["--max_body_mb", "0"], "--max_body_mb must be > 0"),
    (["--max_json_depth", "2"], "--max_json_depth must be >= 3"),
    (["--max_json_items", "0"], "--max_json_items must be >= 3"),
    (["--read_timeout", "0"], "--read_timeout must be > 0"),
    (["--header_timeout", "0"], "--header_timeout must be > 0"),
    (["--backlog", "-1"], "--backlog must be >= 0"),
    (["--port", "99999"], "--port must be 0-65535 (0 picks a free port), got 99999"),
    (["--port", "-1"], "--port must be 0-65535"),
    (["--reward_kwargs", "{bad"], "--reward_kwargs is not valid JSON"),
    (["--reward_kwargs", "[1]"], "--reward_kwargs must be a JSON object"),
    (["--host", "999.1.1.1"], "--host '999.1.1.1' cannot be resolved"),
]


@pytest.mark.parametrize(
    ("argv", "message"), REFUSED_AT_STARTUP, ids=lambda a: " ".join(a) if isinstance(a, list) else ""
)
def test_the_script_refuses_a_useless_server_before_loading_the_reward(
    argv, message, launch_script, monkeypatch, capsys
):
    script = launch_script("reward_server")
    monkeypatch.setattr(script, "load_reward", lambda *a, **k: pytest.fail("loaded the reward"))
    assert run_cli(lambda: script.main(["--reward", "jpeg_incompressibility", "--port", "0", *argv])) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1, error


def test_the_script_refuses_a_port_in_use_before_loading_the_reward(launch_script, monkeypatch, capsys):
    script = launch_script("reward_server")
    monkeypatch.setattr(script, "load_reward", lambda *a, **k: pytest.fail("loaded the reward"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli(lambda: script.main(["--reward", "jpeg_incompressibility", "--port", str(port)])) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot serve on 127.0.0.1:{port}: ") and error.count("\n") == 1
    assert "pick another --port (0 picks a free one)" in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reward", "nope"], "error: unknown reward 'nope'; built-ins: ["),
        (["--reward", "jpeg_incompressibility", "--reward_kwargs", '{"x": 1}'], "does not accept the arguments ['x']"),
    ],
)
def test_the_script_names_an_unknown_reward_or_argument_in_one_line(argv, message, launch_script, capsys):
    assert run_cli(lambda: launch_script("reward_server").main([*argv, "--port", "0"])) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("error: ") and error.count("\n") == 1


def test_the_script_takes_only_known_log_levels(launch_script, capsys):
    script = launch_script("reward_server")
    assert script.parse_args(["--reward", "r", "--log_level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--reward", "r", "--log_level", "LOUD"])
    assert exit_.value.code == 2 and "argument --log_level: invalid choice: 'LOUD'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, bound",
    [("workers", 0, ">= 1"), ("max_images", 0, ">= 1"), ("max_body_bytes", 0, "> 0"), ("read_timeout", 0, "> 0"),
     ("max_json_depth", 2, ">= 3"), ("backlog", -1, ">= 0")],
)  # fmt: skip
def test_server_limits_refuse_what_the_script_refuses(field, value, bound):
    with pytest.raises(ValueError, match=rf"ServerLimits.{field} must be {bound} \(.*\), got {value}$"):
        ServerLimits(**{field: value})


def test_the_script_run_as_a_command_prints_one_error_line_and_exits_2():
    """``python launch/reward_server.py --workers 0`` once started a server that never answered."""
    command = [sys.executable, str(Path(__file__).resolve().parents[2] / "launch" / "reward_server.py")]
    done = subprocess.run(
        [*command, "--reward", "jpeg_incompressibility", "--port", "0", "--workers", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: --workers must be >= 1 (requests are served by that many threads), got 0\n"
