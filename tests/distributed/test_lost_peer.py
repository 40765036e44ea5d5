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


def test_a_gradient_all_reduce_whose_peer_is_gone_is_a_lost_peer():
    """Under DDP the all-reduce runs in the backward's hooks: gloo's error comes out of autograd's engine."""
    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    assert is_lost_peer(raised_in("/venv/lib/python3.11/site-packages/torch/autograd/graph.py", error))
    timeout = RuntimeError("Application timeout caused pair closure")
    assert is_lost_peer(raised_in(COLLECTIVE, timeout))


def test_a_reward_failure_with_network_words_is_not_a_lost_peer():
    """A remote judge timing out is a reward failure: the processes agree on it and checkpoint, not exit at once."""
    timeout = RewardError("reward 'remote' failed: ReadTimeout: HTTPConnectionPool(host='judge'): Read timed out.")
    reset = RuntimeError("ConnectionResetError: [Errno 104] Connection reset by peer")
    assert not is_lost_peer(raised_in("/repo/rewards/remote.py", timeout))
    assert not is_lost_peer(raised_in(COLLECTIVE, timeout))  # a reward's error, wherever it surfaced
    assert not is_lost_peer(raised_in("/repo/rewards/remote.py", reset))
    assert not is_lost_peer(raised_in(COLLECTIVE, ValueError("Connection closed by peer")))  # not a RuntimeError
    assert not is_lost_peer(RuntimeError("Connection closed by peer"))  # never raised: no frame to tell by


def _backward_after_the_peer_left(rank: int, init: str, verdict: str) -> None:
    import datetime
    import os
    from pathlib import Path

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    dist.barrier()
    if rank == 1:
        os._exit(0)  # gone without a word, as a killed node
    try:
        model(torch.ones(1, 2)).sum().backward()  # the gradient all-reduce meets the closed connection
        Path(verdict).write_text("no error")
    except RuntimeError as error:
        Path(verdict).write_text(str(is_lost_peer(error)))


def test_a_real_ddp_backward_whose_peer_left_is_a_lost_peer(tmp_path):
    import torch.multiprocessing as mp

    verdict = tmp_path / "verdict"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(
        _backward_after_the_peer_left, args=(init, str(verdict)), nprocs=2, join=True, start_method="spawn"
    )
    assert verdict.read_text() == "True"
