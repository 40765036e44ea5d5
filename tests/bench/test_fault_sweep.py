"""The fault sweep's verdicts on hand-made outcomes, and real cases end to end: two trainer cases, and server and
client cases against a real reward server."""

import json
import subprocess
from pathlib import Path

from bench.fault_sweep import CASES, Case, CaseNotRun, judge, main, report_lines, run, sweep
from bench.server_faults import NET_CASES, refusal


def _done(code: int, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], code, stdout="", stderr=stderr)


def _case(expect: str | None, check=None, failed_check: str = "silent misbehaviour") -> Case:
    return Case("case", "a fault", lambda folder: [], expect, "tests/x.py", check, failed_check=failed_check)


def test_judge_by_hand(tmp_path: Path):
    named = _case("bad_key")
    assert judge(named, _done(2, "error: unknown config key 'bad_key'"), tmp_path) == "clear error"
    assert judge(named, _done(2, "error: something else"), tmp_path) == "unclear error"  # names nothing
    traceback = "Traceback (most recent call last):\n  ...\nValueError: bad_key"
    assert judge(named, _done(1, traceback), tmp_path) == "unclear error"
    assert judge(named, _done(0, ""), tmp_path) == "silent misbehaviour"  # it should have stopped
    assert judge(_case(None), _done(0, ""), tmp_path) == "handled"
    assert judge(_case(None, check=lambda f: False, failed_check="work lost"), _done(0, ""), tmp_path) == "work lost"
    assert judge(_case(None, check=lambda f: False), _done(0, ""), tmp_path) == "silent misbehaviour"
    assert judge(_case(None), _done(1, traceback), tmp_path) == "unclear error"
    # a clear error that lost what came before it (the full disk took the first checkpoint with it)
    full_disk = _case("disk is full", check=lambda f: False, failed_check="work lost")
    assert judge(full_disk, _done(2, "error: the disk is full"), tmp_path) == "work lost"
    # a clear error after the fault did harm of another kind (the malicious checkpoint's code ran)
    assert judge(_case("state.pt", check=lambda f: False), _done(2, "error: state.pt"), tmp_path) == (
        "silent misbehaviour"
    )


def test_a_warning_a_finished_run_must_print_is_judged(tmp_path: Path):
    loud = Case("case", "a fault", lambda folder: [], None, "tests/x.py", warns="native 64 x 64 px")
    assert judge(loud, _done(0, "WARNING ... this pipeline's native 64 x 64 px ..."), tmp_path) == "handled"
    assert judge(loud, _done(0, ""), tmp_path) == "silent misbehaviour"  # finished without a word


def test_a_case_without_an_output_dir_writes_in_its_own_folder(tmp_path: Path, monkeypatch):
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command))
    run(["--height", "512"], tmp_path)  # the shipped config's runs/tiny_shapes would be resumed by later cases
    run(["--output_dir", str(tmp_path / "mine")], tmp_path)
    assert commands[0][-2:] == ["--output_dir", str(tmp_path / "run")]
    assert commands[1].count("--output_dir") == 1


def test_a_fault_this_machine_cannot_set_up_is_reported_not_run():
    def needs_root(folder: Path) -> list[str]:
        raise CaseNotRun("mounting a small tmpfs needs root")

    rows = sweep([Case("full_disk", "a full disk", needs_root, "the disk is full", "tests/x.py")])
    assert rows == [{"case": "full_disk", "fault": "a full disk", "outcome": "not run",
                     "message": "mounting a small tmpfs needs root", "test": "tests/x.py", "exit": None}]  # fmt: skip


def test_every_case_names_a_test_that_exists():
    root = Path(__file__).resolve().parents[2]
    cases = [*CASES, *NET_CASES]
    assert len({case.name for case in cases}) == len(cases)
    assert all((root / case.test).is_file() for case in cases), [c.test for c in cases if not (root / c.test).is_file()]


def test_two_real_cases_are_clear_errors(tmp_path: Path):
    rows = main(["--only", "unknown_key,jsonl_bad_line", "--out", str(tmp_path / "f.json"), "--results", ""])
    assert {row["case"]: row["outcome"] for row in rows} == {"unknown_key": "clear error",
                                                            "jsonl_bad_line": "clear error"}  # fmt: skip
    assert json.loads((tmp_path / "f.json").read_text()) == rows
    table = report_lines(rows, "python bench/fault_sweep.py")
    assert "2 faults: 2 clear error." in table


def test_refusals_judged_by_hand():
    assert refusal(413, {"error": "9 images; at most --max_images 8"}, 413, "--max_images") == (
        "clear error", "HTTP 413: 9 images; at most --max_images 8")  # fmt: skip
    assert refusal(500, {"error": "Traceback"}, 413, "--max_images")[0] == "unclear error"  # the wrong status
    assert refusal(413, {"error": "too big"}, 413, "--max_images")[0] == "unclear error"  # names no limit
    assert refusal(200, {"scores": {}}, 413, "--max_images")[0] == "silent misbehaviour"  # accepted


def test_server_and_client_cases_against_a_real_server(tmp_path: Path):
    names = "server_deep_json,server_no_token,server_fifty_clients,client_trickling_server"
    rows = main(["--only", names, "--out", str(tmp_path / "f.json"), "--results", ""])
    assert {row["case"]: row["outcome"] for row in rows} == {
        "server_deep_json": "clear error", "server_no_token": "clear error", "server_fifty_clients": "handled",
        "client_trickling_server": "clear error"}  # fmt: skip
    assert rows[0]["message"] == "HTTP 400: JSON nested deeper than --max_json_depth 32"
