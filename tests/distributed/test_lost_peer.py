"""Telling a collective that lost its peer from a reward failure that happens to use the same words."""

import pytest

from rewards.base import RewardError
from rl.distributed import is_lost_peer


def raised_in(filename: str, error: BaseException) -> BaseException:
    """``error`` as raised by code in ``filename`` (its traceback's innermost frame names that file)."""
    try:
        exec(compile("raise error", filename, "exec"), {"error": error})
    except BaseException as caught:
        return caught
    raise AssertionError("not raised")


COLLECTIVE = "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py"


@pytest.mark.parametrize("message", ["Connection closed by peer", "[../gloo/pair.cc:534] Read error: Connection reset by peer", "Timed out waiting 1800000ms for recv operation"])  # fmt: skip
def test_a_collective_whose_peer_is_gone_is_a_lost_peer(message):
    assert is_lost_peer(raised_in(COLLECTIVE, RuntimeError(message)))


def test_a_reward_failure_with_network_words_is_not_a_lost_peer():
    """A remote judge timing out is a reward failure: the processes agree on it and checkpoint, not exit at once."""
    timeout = RewardError("reward 'remote' failed: ReadTimeout: HTTPConnectionPool(host='judge'): Read timed out.")
    reset = RuntimeError("ConnectionResetError: [Errno 104] Connection reset by peer")
    assert not is_lost_peer(raised_in("/repo/rewards/remote.py", timeout))
    assert not is_lost_peer(raised_in("/repo/rewards/remote.py", reset))
    assert not is_lost_peer(raised_in(COLLECTIVE, ValueError("Connection closed by peer")))  # not a RuntimeError
    assert not is_lost_peer(RuntimeError("Connection closed by peer"))  # never raised: no frame to tell by
