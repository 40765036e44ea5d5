"""The fault sweep's verdicts on hand-made outcomes, and two real cases end to end (a clear error each)."""

import json
import subprocess
from pathlib import Path

from bench.fault_sweep import CASES, Case, judge, main, report_lines


def _done(code: int, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], code, stdout="", stderr=stderr)


def _case(expect: str | None, check=None, name: str = "case") -> Case:
    return Case(name, "a fault", lambda folder: [], expect, "tests/x.py", check)


def test_judge_by_hand(tmp_path: Path):
    named = _case("bad_key")
    assert judge(named, _done(2, "error: unknown config key 'bad_key'"), tmp_path) == "clear error"
    assert judge(named, _done(2, "error: something else"), tmp_path) == "unclear error"  # names nothing
    traceback = "Traceback (most recent call last):\n  ...\nValueError: bad_key"
    assert judge(named, _done(1, traceback), tmp_path) == "unclear error"
    assert judge(named, _done(0, ""), tmp_path) == "silent misbehaviour"  # it should have stopped
    assert judge(_case(None), _done(0, ""), tmp_path) == "handled"
    assert judge(_case(None, check=lambda f: False, name="resume_x"), _done(0, ""), tmp_path) == "work lost"
    assert judge(_case(None, check=lambda f: False), _done(0, ""), tmp_path) == "silent misbehaviour"
    assert judge(_case(None), _done(1, traceback), tmp_path) == "unclear error"


def test_every_case_names_a_test_that_exists():
    root = Path(__file__).resolve().parents[2]
    assert len({case.name for case in CASES}) == len(CASES)
    assert all((root / case.test).is_file() for case in CASES), [c.test for c in CASES if not (root / c.test).is_file()]


def test_two_real_cases_are_clear_errors(tmp_path: Path):
    rows = main(["--only", "unknown_key,jsonl_bad_line", "--out", str(tmp_path / "f.json"), "--results", ""])
    assert {row["case"]: row["outcome"] for row in rows} == {"unknown_key": "clear error",
                                                            "jsonl_bad_line": "clear error"}  # fmt: skip
    assert json.loads((tmp_path / "f.json").read_text()) == rows
    table = report_lines(rows, "python bench/fault_sweep.py")
    assert "2 faults: 2 clear error." in table
