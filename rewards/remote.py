"""Remote rewards over HTTP, so heavy models (GenEval's detector, a VLM judge) live in their own environment.

Protocol (JSON both ways, images as base64 PNG; never pickle)::

    POST <url>/score  {"images": ["<base64 PNG>", ...], "prompts": [...], "metadata": [{...}, ...]}
      200             {"scores": {"<key>": [float, ...], ...}}     first key = main score; NaN allowed
      4xx / 5xx       {"error": "<message>"}
    GET  <url>/health {"status": "ok", "reward": "<spec>", "limits": {"max_images": N, ...}}

A server started with a token (``$REWARD_SERVER_TOKEN``) answers only requests carrying
``Authorization: Bearer <token>``, and HTTP 401 to the rest.

:class:`RemoteReward` (registered as ``remote``) is the client: it sends batches of ``batch_size`` images,
gives each request ``timeout`` seconds in all (connecting, sending, and every byte of the answer) and retries
connection failures, timeouts and HTTP 429/502/503/504 with exponential backoff (``backoff``, 2x, 4x, ...
seconds), at most ``retries`` times per request. ``retries`` also bounds the failures in a row of a whole scoring
step (:func:`~rewards.base.scoring_step`: a training step of the reward set, every batch its threads score and
their group-by-group retries; any answer starts the count again), and a server given up on is not asked again
in that step, so a server that is down costs one failed step, not one per group, while one that now and then
fails an attempt (an overloaded proxy's 503) keeps scoring. :meth:`RemoteReward.check_health`, called when the reward
set is built, fails the run at setup when the server is down, refuses the token or takes fewer images per request
than ``batch_size``. Images travel as 8-bit PNG, so the server scores exactly what ``to_pil`` would give a local
reward.

The server is :mod:`rewards.server` (``launch/reward_server.py`` is its command line).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.parse

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardError, check_scores, register, scoring_step, to_pil

logger = logging.getLogger(__name__)

RETRY_STATUS = (429, 502, 503, 504)
TOKEN_ENV = "REWARD_SERVER_TOKEN"
HEALTH_TIMEOUT = 10.0  # seconds: a health check that fails, fails at setup in seconds, not after a long timeout
# a batch's scores are a few KB: an answer past this is a mis-pointed URL or a hostile server, and reading it whole
# (4 GB streamed over loopback within the default timeout, before this bound) would fill the trainer's memory
MAX_ANSWER_BYTES = 16 * 2**20


class RemoteRewardError(RewardError):
    """The reward server could not be reached, timed out, failed or answered something unusable."""


def encode_images(images: torch.Tensor) -> list[str]:
    """``[B, 3, H, W]`` in [0, 1] -> B base64 PNG strings (8 bits per channel)."""
    encoded = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_images(encoded: list[str]) -> torch.Tensor:
    """B base64 PNG strings -> ``[B, 3, H, W]`` float in [0, 1].

    Each image is decoded into its slot of one float32 tensor, so memory is that tensor (12 bytes a pixel) plus
    one image's decoding, not several copies of the whole batch.

    Raises:
        ValueError: for a string that is not a base64 PNG, or images of different sizes.
    """
    batch: torch.Tensor | None = None
    for index, text in enumerate(encoded):
        try:
            data = io.BytesIO(base64.b64decode(text, validate=True))
            image = Image.open(data, formats=["PNG"]).convert("RGB")  # PNG only: the size the server checked
        except Exception as error:
            raise ValueError(f"image {index} is not a base64-encoded PNG ({error})") from error
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # one image's copy, writable
        del image
        if batch is None:
            batch = torch.empty(len(encoded), *pixels.shape)
        elif pixels.shape != batch.shape[1:]:
            raise ValueError(
                f"images in one request must share a size, got {tuple(batch.shape[1:])} and {tuple(pixels.shape)} "
                f"(image {index})"
            )
        batch[index].copy_(pixels).div_(255)
    return batch if batch is not None else torch.empty(0, 3, 0, 0)


def check_token(token: str, where: str) -> str:
    """``token`` itself, after checking it can travel in an HTTP header.

    Raises:
        ValueError: for a token that is not printable ASCII, naming ``where`` it came from.
    """
    if not (token.isascii() and token.isprintable() and " " not in token):
        raise ValueError(f"the token in {where} must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)")
    return token


class DeadlineReader(io.RawIOBase):
    """A socket's reads, all ending by one deadline (``time.monotonic()`` seconds).

    Each read waits at most the time left, so a peer trickling a byte at a time is cut off at the deadline,
    where a plain socket timeout (which bounds each read) would wait forever. Like ``sock.makefile()``, it keeps
    the socket open until it is closed itself (http.client closes the connection before reading the body).
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock, self.deadline = sock, deadline
        self.stream = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)
        return self.stream.readinto(buffer)

    def close(self) -> None:
        self.stream.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response whose status line, headers and body are all read by ``deadline``."""

    def __init__(self, sock: socket.socket, *args, deadline: float, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()
        self.fp = io.BufferedReader(DeadlineReader(sock, deadline))


class _NoAnswer(Exception):
    """A request got no HTTP answer (connection failed or timed out); the message says which."""


_BUDGET_LOCK = threading.Lock()


@dataclasses.dataclass
class _StepBudget:
    """The retries one scoring step has left since the server last answered, and why it gave the server up, once
    it has (the reward set's threads share it within a training step)."""

    retries: int
    gave_up: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.full = self.retries

    def take_retry(self) -> bool:
        """Spend one retry if one is left."""
        with self.lock:
            if not self.retries:
                return False
            self.retries -= 1
            return True

    def answered(self) -> None:
        """The server answered: the failures before were blips, not a server that is down."""
        with self.lock:
            self.retries = self.full


@register("remote")
class RemoteReward:
    """Scores images on a reward server (``launch/reward_server.py``).

    Args:
        url: the server's base URL, e.g. ``http://gpu-node-3:8000`` (a trailing ``/score`` is ignored).
        timeout: seconds one request (a batch of ``batch_size`` images) may take in all, from connecting to the
            last byte of the answer.
        retries: further attempts of a request after a connection failure, a timeout or HTTP 429/502/503/504; also
            the failures in a row (since the server last answered) after which a scoring step (a training step
            of the reward set: all its batches and group-by-group retries) gives the server up.
        backoff: seconds before the first retry; doubled for each next one.
        batch_size: images per request; at most the server's ``--max_images``.
        headers: extra HTTP headers (e.g. for a proxy in front of the server).
        token_env: environment variable holding the server's token, sent as ``Authorization: Bearer <token>``
            when set. The token itself is never a reward argument, so it stays out of the saved run config.

    It keeps no state between calls, so ``reward_workers`` > 1 sends batches concurrently.
    """

    thread_safe = True

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 64,
        headers: dict[str, str] | None = None,
        token_env: str = TOKEN_ENV,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/").removesuffix("/score")  # the base URL; "<base>/score" is accepted too
        self._parts = urllib.parse.urlsplit(self.url)
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.token_env = token_env
        token = os.environ.get(token_env, "")
        auth = {"Authorization": f"Bearer {check_token(token, '$' + token_env)}"} if token else {}
        self.headers = {"Content-Type": "application/json", **auth, **(headers or {})}

    @property
    def longest_request_s(self) -> float:
        """How long one request can take with its retries: every attempt timing out, and the backoffs between."""
        return (self.retries + 1) * self.timeout + self.backoff * (2**self.retries - 1)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        chunks: dict[str, list[torch.Tensor]] = {}
        with scoring_step() as step:  # joins the reward set's step; called alone, this call is the step
            with _BUDGET_LOCK:  # the step's threads must all find the same budget
                budget = step.setdefault(self, _StepBudget(self.retries))
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                scores = self._score(images[start:stop], prompts[start:stop], metadata[start:stop], budget)
                if chunks and list(scores) != list(chunks):
                    raise RemoteRewardError(
                        f"remote reward at {self.url} returned keys {list(scores)} for one batch and {list(chunks)} "
                        "for another; the server's reward must always return the same keys"
                    )
                for key, value in scores.items():
                    chunks.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in chunks.items()}

    def check_health(self) -> None:
        """``GET <url>/health`` once, within ``HEALTH_TIMEOUT`` seconds (or ``timeout`` if shorter).

        Raises:
            RemoteRewardError: naming the URL, when the server does not answer, refuses the token, is not a
                reward server, or takes fewer images per request than ``batch_size``.
        """
        try:
            status, raw = self._request("GET", "/health", None, min(self.timeout, HEALTH_TIMEOUT))
        except _NoAnswer as error:
            raise RemoteRewardError(
                f"remote reward at {self.url} failed its health check: {error}. Start the server first "
                "(python launch/reward_server.py --reward <spec> --port <port>) and check the url in reward_kwargs."
            ) from error
        if status != 200:
            raise RemoteRewardError(
                f"remote reward at {self.url} failed its health check: HTTP {status}: {_detail(raw, status)}. "
                f"{self._hint(status) or 'Is the URL a reward server (launch/reward_server.py)?'}"
            )
        try:
            answer = parse_json(raw)
            max_images = answer.get("limits", {}).get("max_images", self.batch_size)
        except (ValueError, AttributeError) as error:
            raise RemoteRewardError(
                f"remote reward at {self.url} answered its health check with {raw[:80]!r}, not a reward server's "
                "answer. Is the URL a reward server (launch/reward_server.py)?"
            ) from error
        if self.batch_size > max_images:
            raise RemoteRewardError(
                f"remote reward at {self.url} takes at most {max_images} images per request (its --max_images), "
                f"but batch_size is {self.batch_size}: lower batch_size in reward_kwargs or raise --max_images"
            )

    def _score(self, images, prompts, metadata, budget: _StepBudget) -> dict[str, torch.Tensor]:
        try:
            body = json.dumps({"images": encode_images(images), "prompts": prompts, "metadata": metadata})
        except TypeError as error:
            raise TypeError(
                f"the remote reward sends metadata as JSON, and it is not JSON-serialisable: {error}"
            ) from error
        return self._parse(self._post("/score", body.encode(), budget), len(images))

    def _post(self, path: str, body: bytes, budget: _StepBudget) -> bytes:
        """POST with the step's retries; the answer's body, or an error saying what failed."""
        if budget.gave_up:
            raise RemoteRewardError(
                f"remote reward at {self.url} was given up on earlier in this step ({budget.gave_up}); it is tried "
                "again next step"
            )
        attempts = 0
        while True:
            attempts += 1
            try:
                status, raw = self._request("POST", path, body, self.timeout)
            except _NoAnswer as error:
                problem = str(error)
            else:
                if status == 200:
                    budget.answered()
                    return raw
                if status not in RETRY_STATUS:
                    hint = self._hint(status) or "Check the server's log and its reward"
                    raise RemoteRewardError(
                        f"remote reward at {self.url} answered HTTP {status}: {_detail(raw, status)}. {hint} "
                        "(the client does not retry this)."
                    )
                problem = f"HTTP {status}: {_detail(raw, status)}"
            if attempts > self.retries or not budget.take_retry():
                break
            logger.warning("remote reward %s: attempt %d failed (%s); retrying", self.url, attempts, problem)
            time.sleep(self.backoff * 2 ** (attempts - 1))
        budget.gave_up = problem
        spent = (
            " (other requests of this step failed the rest of the retries in a row)" if attempts <= self.retries else ""
        )
        raise RemoteRewardError(
            f"remote reward at {self.url} failed on all {attempts} attempts{spent} (retries={self.retries} per "
            f"request and in a row per step, backoff {self.backoff} s, doubling): {problem}. Is the server running and reachable "
            "(python launch/reward_server.py --reward <spec> --port <port>; for other machines --host 0.0.0.0 with "
            "$REWARD_SERVER_TOKEN set)? If it is just slow, "
            "raise the remote reward's timeout or lower its batch_size in reward_kwargs."
        )

    def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        """One HTTP exchange, all of it within ``timeout`` seconds: ``(status, body)``.

        Raises:
            _NoAnswer: when it cannot connect, the connection fails, or the deadline passes.
        """
        deadline = time.monotonic() + timeout
        https = self._parts.scheme == "https"
        connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
        connection = connection_class(self._parts.hostname, self._parts.port, timeout=timeout)
        connection.response_class = functools.partial(_DeadlineResponse, deadline=deadline)
        try:
            try:
                connection.connect()
            except OSError as error:
                if time.monotonic() >= deadline or isinstance(error, TimeoutError):
                    raise _NoAnswer(f"no answer within timeout={timeout} s (connecting)") from error
                raise _NoAnswer(f"cannot connect ({error})") from error
            connection.sock.settimeout(max(deadline - time.monotonic(), 1e-3))  # sending counts against it too
            connection.request(method, self._parts.path + path, body=body, headers=self.headers)
            response = connection.getresponse()
            if response.length is not None and response.length > MAX_ANSWER_BYTES:
                raise self._too_large(f"{response.length} bytes (its Content-Length)")
            raw = response.read(MAX_ANSWER_BYTES + 1)  # a chunked or unannounced answer is cut off here
            if len(raw) > MAX_ANSWER_BYTES:
                raise self._too_large("unannounced length")
            return response.status, raw
        except (OSError, http.client.HTTPException) as error:
            if time.monotonic() >= deadline or isinstance(error, TimeoutError):
                raise _NoAnswer(f"no answer within timeout={timeout} s") from error
            raise _NoAnswer(f"connection failed ({type(error).__name__}: {error})") from error
        finally:
            connection.close()

    def _too_large(self, size: str) -> RemoteRewardError:
        return RemoteRewardError(
            f"remote reward at {self.url} sent an answer of {size}, more than the {MAX_ANSWER_BYTES} bytes the "
            "client reads (a batch's scores take a few KB). Is the URL a reward server (launch/reward_server.py)?"
        )

    def _hint(self, status: int) -> str:
        """What to do about an answer the client does not retry; empty when the server's message says it all."""
        if status == 401:
            state = "is set but is not the server's token" if "Authorization" in self.headers else "is not set"
            return f"The server wants a token and ${self.token_env} {state}: set it to the server's token"
        if status == 413:
            return "Lower the remote reward's batch_size in reward_kwargs, or raise the server's limit"
        return ""

    def _parse(self, raw: bytes, batch_size: int) -> dict[str, torch.Tensor]:
        fix = f'expected {{"scores": {{"<key>": [{batch_size} numbers]}}}}'
        try:
            answer = parse_json(raw)
        except ValueError as error:
            raise RemoteRewardError(
                f"remote reward at {self.url} sent a malformed answer (not JSON: {error}; starts {raw[:80]!r}); {fix}. "
                "Is the URL a reward server (launch/reward_server.py)?"
            ) from error
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, dict) or not scores:
            raise RemoteRewardError(f"remote reward at {self.url} sent a malformed answer {str(answer)[:120]}; {fix}")
        try:
            values = {key: [np.nan if v is None else v for v in value] for key, value in scores.items()}
            return check_scores(f"remote {self.url}", values, batch_size)
        except (TypeError, RewardError) as error:
            raise RemoteRewardError(f"remote reward at {self.url} sent a malformed answer: {error}; {fix}") from error


def parse_json(raw: bytes) -> object:
    """``json.loads``, with JSON nested past Python's recursion limit (a hostile server's) a ValueError too."""
    try:
        return json.loads(raw)
    except RecursionError as error:
        raise ValueError("nested too deep") from error


def _detail(raw: bytes, status: int) -> str:
    """The ``error`` of a JSON error body, else the status's standard phrase."""
    try:
        return str(parse_json(raw)["error"])
    except Exception:
        return http.client.responses.get(status, "unknown status")
