"""Serve a reward over HTTP, so a heavy model (GenEval's detector, a VLM judge) runs in its own environment.

Any built-in name or dotted path works, with the trainer's ``reward_kwargs`` for that one reward::

    python launch/reward_server.py --reward pickscore --host 0.0.0.0 --port 8000
    python launch/reward_server.py --reward mypkg.judge:VlmJudge --reward_kwargs '{"model": "/ckpt"}' --port 8001

then train against it with ``--reward remote --reward_kwargs '{"remote": {"url": "http://<host>:8000"}}'``.
The protocol (JSON, base64 PNG images, no pickle) is documented in ``rewards/remote.py``. Port 0 picks a
free port; the first line printed is ``serving <reward> on http://<host>:<port>``.

Facing a network, give it a token: ``export REWARD_SERVER_TOKEN=$(openssl rand -hex 32)`` before starting it,
and the same variable in the trainer's environment (the remote client sends it). Every request past a limit
below gets a JSON error and a 4xx status; ``rewards/server.py`` says what each limit costs in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rewards.base import load_reward
from rewards.remote import TOKEN_ENV
from rewards.server import ServerLimits, make_server
from rl.config_help import HelpFormatter

LIMITS = ServerLimits()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--reward", required=True, help="built-in name or package.module:Callable")
    parser.add_argument("--reward_kwargs", default="{}", help="JSON object of the reward's constructor arguments")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--log_level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR")
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
    limits.add_argument("--workers", type=int, default=LIMITS.workers, help="connections handled at once")
    limits.add_argument(
        "--backlog", type=int, default=LIMITS.backlog, help="connections queued while every worker is busy"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = json.loads(args.reward_kwargs)
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--reward_kwargs must be a JSON object, got {args.reward_kwargs!r}")
    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        max_json_depth=args.max_json_depth,
        max_json_items=args.max_json_items,
        read_timeout=args.read_timeout,
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
    server = make_server(load_reward(args.reward, **kwargs), args.reward, args.host, args.port, limits, token)
    print(f"serving {args.reward} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
