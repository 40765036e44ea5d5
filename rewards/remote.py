"""Remote rewards over HTTP, so heavy models (GenEval's detector, a VLM judge) live in their own environment.

Protocol (JSON both ways, images as base64 PNG; never pickle)::

    POST <url>/score  {"images": ["<base64 PNG>", ...], "prompts": [...], "metadata": [{...}, ...]}
      200             {"scores": {"<key>": [float, ...], ...}}     first key = main score; NaN allowed
      4xx / 5xx       {"error": "<message>"}
    GET  <url>/health {"status": "ok", "reward": "<spec>"}

:class:`RemoteReward` (registered as ``remote``) is the client: it sends batches of ``batch_size`` images,
waits ``timeout`` seconds per request and retries connection failures, timeouts and HTTP 429/502/503/504 up
to ``retries`` times with exponential backoff (``backoff``, 2x, 4x, ... seconds). Images travel as 8-bit PNG,
so the server scores exactly what ``to_pil`` would give a local reward.

:func:`make_server` serves any reward (``launch/reward_server.py`` is its command line); calls to the reward
are serialised by a lock, so the reward need not be thread-safe.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

from rewards.base import Reward, RewardError, check_scores, register, to_pil

logger = logging.getLogger(__name__)

RETRY_STATUS = (429, 502, 503, 504)


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

    Raises:
        ValueError: for a string that is not a base64 image, or images of different sizes.
    """
    arrays = []
    for index, text in enumerate(encoded):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")
        except Exception as error:
            raise ValueError(f"image {index} is not a base64-encoded image ({error})") from error
        arrays.append(np.asarray(image))
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images in one request must share a size, got {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 255


@register("remote")
class RemoteReward:
    """Scores images on a reward server (``launch/reward_server.py``).

    Args:
        url: the server's base URL, e.g. ``http://gpu-node-3:8000`` (a trailing ``/score`` is ignored).
        timeout: seconds to wait for one request's answer (a batch of ``batch_size`` images).
        retries: further attempts after a connection failure, a timeout or HTTP 429/502/503/504.
        backoff: seconds before the first retry; doubled for each next one.
        batch_size: images per request.
        headers: extra HTTP headers (e.g. an ``Authorization`` token for a server behind a proxy).

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
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/").removesuffix("/score")  # the base URL; "<base>/score" is accepted too
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        chunks: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            scores = self._score(images[start:stop], prompts[start:stop], metadata[start:stop])
            if chunks and list(scores) != list(chunks):
                raise RemoteRewardError(
                    f"remote reward at {self.url} returned keys {list(scores)} for one batch and {list(chunks)} "
                    "for another; the server's reward must always return the same keys"
                )
            for key, value in scores.items():
                chunks.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in chunks.items()}

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        try:
            body = json.dumps({"images": encode_images(images), "prompts": prompts, "metadata": metadata})
        except TypeError as error:
            raise TypeError(
                f"the remote reward sends metadata as JSON, and it is not JSON-serialisable: {error}"
            ) from error
        return self._parse(self._post("/score", body.encode()), len(images))

    def _post(self, path: str, body: bytes) -> bytes:
        """POST with retries; the answer's body, or an error saying what failed on every attempt."""
        request = urllib.request.Request(self.url + path, data=body, headers=self.headers, method="POST")
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code not in RETRY_STATUS:
                    raise RemoteRewardError(
                        f"remote reward at {self.url} answered HTTP {error.code}: {detail}. Check the server's log "
                        "and its reward (the client does not retry this)."
                    ) from error
                problem = f"HTTP {error.code}: {detail}"
            except TimeoutError:
                problem = f"no answer within timeout={self.timeout} s"
            except urllib.error.URLError as error:
                if isinstance(error.reason, TimeoutError):
                    problem = f"no answer within timeout={self.timeout} s"
                else:
                    problem = f"cannot connect ({error.reason})"
            except (ConnectionError, http.client.HTTPException) as error:
                problem = f"connection failed ({type(error).__name__}: {error})"
            logger.warning("remote reward %s: attempt %d of %d: %s", self.url, attempt + 1, self.retries + 1, problem)
        raise RemoteRewardError(
            f"remote reward at {self.url} failed on all {self.retries + 1} attempts (backoff {self.backoff} s, "
            f"doubling): {problem}. Is the server running and reachable "
            "(python launch/reward_server.py --reward <spec> --host 0.0.0.0 --port <port>)? If it is just slow, "
            "raise the remote reward's timeout or lower its batch_size in reward_kwargs."
        )

    def _parse(self, raw: bytes, batch_size: int) -> dict[str, torch.Tensor]:
        fix = f'expected {{"scores": {{"<key>": [{batch_size} numbers]}}}}'
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
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


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read())["error"])
    except Exception:
        return str(error.reason)


class RewardServer(ThreadingHTTPServer):
    """Serves one reward over the protocol in the module docstring; ``server_address`` has the bound port."""

    daemon_threads = True

    def __init__(self, reward: Reward, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.reward, self.name = reward, name
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "reward": self.server.name})
        else:
            self._send(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            images, prompts = decode_images(request["images"]), list(request["prompts"])
            metadata = list(request.get("metadata") or [{} for _ in prompts])
            if not len(images) == len(prompts) == len(metadata):
                raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        except (ValueError, KeyError, TypeError) as error:
            self._send(400, {"error": f"malformed request ({type(error).__name__}: {error})"})
            return
        try:
            with self.server.lock, torch.no_grad():
                scores = check_scores(self.server.name, self.server.reward(images, prompts, metadata), len(images))
        except Exception as error:
            logger.exception("reward %s failed", self.server.name)
            self._send(500, {"error": f"reward {self.server.name!r} raised {type(error).__name__}: {error}"})
            return
        self._send(200, {"scores": {key: value.tolist() for key, value in scores.items()}})

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timed out) before the answer: nothing to tell it
            logger.warning("reward server: client went away before the answer")

    def log_message(self, format: str, *args) -> None:
        logger.debug("reward server: " + format, *args)


def make_server(reward: Reward, name: str = "reward", host: str = "127.0.0.1", port: int = 0) -> RewardServer:
    """A server for ``reward`` bound to ``host:port`` (0 = a free port); call ``serve_forever()`` to run it."""
    return RewardServer(reward, name, host, port)
