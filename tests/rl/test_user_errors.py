"""The entry scripts' one-line errors (rl/user_errors.py)."""

import errno

import pytest

from rl.user_errors import run_cli


def fails_with(error: BaseException):
    def main():
        raise error

    return main


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError("keep=[6] must decrease within [1, N=4]"), "error: keep=[6] must decrease within [1, N=4]\n"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "error: [Errno 98] Address already in use\n"),
    ],
)  # fmt: skip
def test_a_user_error_is_one_line_and_exit_2(error, line, capsys, monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    assert run_cli(fails_with(error)) == 2
    assert capsys.readouterr().err == line


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors_too(monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        run_cli(fails_with(ZeroDivisionError("a bug")))
    with pytest.raises(KeyError):  # a missing key is a bug too
        run_cli(fails_with(KeyError("capture_steps")))
    monkeypatch.setenv("GRPO_DEBUG", "1")
    with pytest.raises(ValueError):
        run_cli(fails_with(ValueError("shown with its traceback")))
    assert run_cli(lambda: None) == 0
