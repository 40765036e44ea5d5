"""Serve a reward over HTTP, so a heavy model (GenEval's detector, a VLM judge) runs in its own environment.

Any built-in name or dotted path works, with the trainer's ``reward_kwargs`` for that one reward::

    python launch/reward_server.py --reward pickscore --port 8000
    python launch/reward_server.py --reward mypkg.judge:VlmJudge --reward_kwargs '{"model": "/ckpt"}' --port 8001

then train against it with ``--reward remote --reward_kwargs '{"remote": {"url": "http://<host>:8000"}}'``.
The protocol (JSON, base64 PNG images, no pickle) is documented in ``rewards/remote.py``. Port 0 picks a
free port; the first line printed is ``serving <reward> on http://<host>:<port>``.

Facing a network (``--host 0.0.0.0``), give it a token: ``export REWARD_SERVER_TOKEN=$(openssl rand -hex 32)`` before starting it,
and the same variable in the trainer's environment (the remote client sends it). Every request past a limit
below gets a JSON error and a 4xx status; ``rewards/server.py`` says what each limit costs in memory.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rewards.base import RewardImportError, load_reward
from rewards.remote import TOKEN_ENV
from rewards.server import LIMIT_BOUNDS, ServerLimits, address_family, limit_violation, make_server
from rl.config_help import HelpFormatter
from rl.user_errors import USER_ERRORS, run_cli

LIMITS = ServerLimits()
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--reward", required=True, help="built-in name or package.module:Callable")
    parser.add_argument("--reward_kwargs", default="{}", help="JSON object of the reward's constructor arguments")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--log_level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="logging level")
    parser.add_argument(
        "--token_env",
        default=TOKEN_ENV,
        help="environment variable holding the token every request must carry; unset or empty: no token",
    )
    limits = parser.add_argument_group("limits", "each request past one is refused with a 4xx status")
    limits.add_argument(
        "--max_body_mb",
        type=float,
        default=LIMITS.max_body_bytes / 2**20,
        help="largest request body in MiB, refused before it is read; 64 images of 1024x1024 take 100-250 MiB",
    )
    limits.add_argument("--max_images", type=int, default=LIMITS.max_images, help="images per request")
    limits.add_argument(
        "--max_pixels",
        type=int,
        default=LIMITS.max_pixels,
        help="width x height of one image, read from its PNG header before decoding",
    )
    limits.add_argument(
        "--max_request_pixels",
        type=int,
        default=LIMITS.max_request_pixels,
        help="width x height summed over a request's images (held as float32 RGB: 12 bytes a pixel)",
    )
    limits.add_argument("--max_json_depth", type=int, default=LIMITS.max_json_depth, help="nesting of the JSON")
    limits.add_argument(
        "--max_json_items", type=int, default=LIMITS.max_json_items,
        help="commas and colons in a request's JSON (its prompts' and metadata's items; counted before parsing)",
    )  # fmt: skip
    limits.add_argument(
        "--read_timeout",
        type=float,
        default=LIMITS.read_timeout,
        help="seconds a client has to send its whole request; slower ones are dropped",
    )
    limits.add_argument(
        "--header_timeout",
        type=float,
        default=LIMITS.header_timeout,
        help="seconds a client has to send its request line and headers (before its token is checked)",
    )
    limits.add_argument("--workers", type=int, default=LIMITS.workers, help="connections handled at once")
    limits.add_argument(
        "--backlog", type=int, default=LIMITS.backlog, help="connections queued while every worker is busy"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError, naming the option and the fix, for a value that would start a useless server."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535 (0 picks a free port), got {args.port}")
    for field in LIMIT_BOUNDS:
        option = "max_body_mb" if field == "max_body_bytes" else field  # the body's option is in MiB
        problem = limit_violation(field, getattr(args, option))
        if problem:
            raise ValueError(f"--{option} {problem}")


def reward_kwargs(text: str) -> dict:
    """``--reward_kwargs``: a JSON object, or ValueError naming the option."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--reward_kwargs is not valid JSON ({error}): {text!r}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--reward_kwargs must be a JSON object like '{{\"key\": 1}}', got {text!r}")
    return kwargs


def check_address(host: str, port: int) -> None:
    """Bind ``host:port`` once, as the server will, so a bad host or a port in use fails before the reward loads."""
    try:
        with socket.socket(address_family(host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            probe.bind((host, port))
    except OSError as error:
        raise OSError(address_error(host, port, error)) from None


def address_error(host: str, port: int, error: OSError) -> str:
    """One line for a failed bind, naming the option to change."""
    reason = error.strerror or str(error)
    if isinstance(error, socket.gaierror):
        return f"--host {host!r} cannot be resolved ({reason}); use 127.0.0.1, 0.0.0.0 or an address of this machine"
    if error.errno == errno.EADDRINUSE:
        return f"cannot serve on {host}:{port}: {reason}; pick another --port (0 picks a free one)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine ({reason}); use 127.0.0.1 or 0.0.0.0"
    return f"cannot serve on {host}:{port} (--host, --port): {reason}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    kwargs = reward_kwargs(args.reward_kwargs)
    check_address(args.host, args.port)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = ServerLimits(
        max_body_bytes=max(1, int(args.max_body_mb * 2**20)),
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        max_json_depth=args.max_json_depth,
        max_json_items=args.max_json_items,
        read_timeout=args.read_timeout,
        header_timeout=args.header_timeout,
        workers=args.workers,
        backlog=args.backlog,
    )
    token = os.environ.get(args.token_env) or None
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning(
            "serving on %s without a token: anyone who can reach it can use the reward; set $%s",
            args.host,
            args.token_env,
        )
    reward = load_reward(args.reward, **kwargs)
    try:
        server = make_server(reward, args.reward, args.host, args.port, limits, token)
    except OSError as error:  # taken while the reward loaded
        raise OSError(address_error(args.host, args.port, error)) from None
    print(f"serving {args.reward} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    # a reward module that cannot be imported names itself and the fix: one line too
    raise SystemExit(run_cli(main, errors=(*USER_ERRORS, RewardImportError)))
