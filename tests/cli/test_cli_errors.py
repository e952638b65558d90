"""Bad input through the real `edgeseq` command: one `error:` line, exit code 2, no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version

import pytest

USAGE_EXIT_CODE = 2
GOOD_CSV = "t,flow,pressure\n" + "".join(f"{i},{i % 5},{i * 0.5}\n" for i in range(30))
FILES = {
    "good.csv": GOOD_CSV,
    "text.csv": "t,flow,pressure\n0,1,2.0\n1,2,2.5\n2,3,abc\n3,4,3.5\n",
    "gap.csv": "t,flow,pressure\n0,1,2.0\n1,,2.5\n2,3,3.0\n3,4,3.5\n",
    "empty.csv": "",
    "header.csv": "t,flow,pressure\n",
}


def edgeseq(tmp_path, *args):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    # A narrow terminal must not wrap the error line in two.
    env = {**os.environ, "COLUMNS": "40"}
    return subprocess.run(
        [sys.executable, "-m", "edgeseq", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["good.csv", "--target", "presure"], ["'presure'", "not found"], id="column"),
        pytest.param(["text.csv", "--target", "pressure"], ["row 3", "'pressure'", "'abc'"],
                     id="non-numeric"),
        pytest.param(["empty.csv", "--target", "pressure"], ["empty.csv", "empty"], id="empty"),
        pytest.param(["header.csv", "--target", "pressure"], ["header.csv", "no data rows"],
                     id="header-only"),
        pytest.param(["good.csv", "--target", "pressure", "--window", "500"], ["--window 500"],
                     id="window"),
        pytest.param(["good.csv", "--target", "pressure", "--task", "foo"], ["--task", "'foo'"],
                     id="task"),
        pytest.param(["good.csv", "--target", "pressure", "--cell", "bar"], ["--cell", "'bar'"],
                     id="cell"),
        pytest.param(["nowhere.csv", "--target", "pressure"], ["nowhere.csv", "no such file"],
                     id="no-file"),
        pytest.param(["gap.csv", "--target", "pressure"], ["row 2", "'flow'", "--fill"],
                     id="missing-value"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_naming_the_culprit_and_exit_code_2(tmp_path, args, named):
    result = edgeseq(tmp_path, "train", *args, "--epochs", "1")
    lines = result.stderr.splitlines()
    assert result.returncode == USAGE_EXIT_CODE, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and lines[0][len("error: ") :].strip()
    for fragment in named:
        assert fragment in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_the_version_option_prints_the_installed_version_and_exits_0(tmp_path):
    result = edgeseq(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"edgeseq {version('edgeseq')}"


def test_help_lists_the_train_command(tmp_path):
    result = edgeseq(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\W*train\s", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["train", "good.csv", "--time-col", "t"], "task forecast needs --target"),
     (["train", "good.csv", "--task", "classify"], "task classify needs --label-col"),
     (["replay", "recipe.toml", "--out-dir", "missing"], "--out-dir missing is not a folder")],
)  # fmt: skip
def test_what_long_work_needs_is_checked_before_any_of_it(tmp_path, args, message):
    """No data read, no progress bar, no training: the error first."""
    result = edgeseq(tmp_path, *args)
    assert result.returncode == USAGE_EXIT_CODE
    assert message in result.stderr and not result.stdout.strip(), (result.stdout, result.stderr)


def test_a_labels_file_without_ids_hints_at_id_col(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "t,acc,label\n"
        + "".join(f"{i},{i * 0.1},{'walk' if i < 5 else 'run'}\n" for i in range(10))
    )
    result = edgeseq(tmp_path, "train", "labels.csv", "--task", "classify", "--label-col", "label")
    assert result.returncode != 0 and "give it with --id-col" in result.stderr, result.stderr


def test_option_help_keeps_its_defaults_in_brackets(tmp_path):
    result = subprocess.run([sys.executable, "-m", "edgeseq", "train", "--help"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert "Run directory [default: runs/<csv>-<task>-<cell>]." in result.stdout
    assert " ." not in result.stdout
