"""Serve a reward over HTTP, so a heavy model (GenEval's detector, a VLM judge) runs in its own environment.

Any built-in name or dotted path works, with the trainer's ``reward_kwargs`` for that one reward::

    python launch/reward_server.py --reward pickscore --host 0.0.0.0 --port 8000
    python launch/reward_server.py --reward mypkg.judge:VlmJudge --reward_kwargs '{"model": "/ckpt"}' --port 8001

then train against it with ``--reward remote --reward_kwargs '{"remote": {"url": "http://<host>:8000"}}'``.
The protocol (JSON, base64 PNG images, no pickle) is documented in ``rewards/remote.py``. Port 0 picks a
free port; the first line printed is ``serving <reward> on http://<host>:<port>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rewards.base import load_reward
from rewards.remote import make_server
from rl.config_help import HelpFormatter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--reward", required=True, help="built-in name or package.module:Callable")
    parser.add_argument("--reward_kwargs", default="{}", help="JSON object of the reward's constructor arguments")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--log_level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = json.loads(args.reward_kwargs)
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--reward_kwargs must be a JSON object, got {args.reward_kwargs!r}")
    server = make_server(load_reward(args.reward, **kwargs), args.reward, args.host, args.port)
    print(f"serving {args.reward} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
