"""scripts/bootstrap.sh builds .venv with the newest Python 3.12+ on PATH or in pyenv's versions
folder (mitmproxy 12 needs 3.12), and says what it needs when there is none."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

TOOLS = ("bash", "ls", "grep", "sort", "dirname", "cat", "sha256sum", "cut")


def fake_python(path: Path, minor: int) -> Path:
    """A stand-in that answers the bootstrap's one question, the minor version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {minor}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def machine(tmp_path):
    """A PATH with only the shell tools the bootstrap uses, and an empty pyenv root."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        (tools / tool).symlink_to(shutil.which(tool))
    on_path = tmp_path / "bin"
    on_path.mkdir()
    return tools, on_path, tmp_path / "pyenv"


def choice(machine) -> subprocess.CompletedProcess:
    tools, on_path, pyenv = machine
    env = {"PATH": f"{on_path}:{tools}", "HOME": str(pyenv.parent), "PYENV_ROOT": str(pyenv)}
    return subprocess.run(
        [shutil.which("bash"), "scripts/bootstrap.sh", "--which-python"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def test_python_3_11_first_on_path_gives_way_to_pyenvs_newest(machine):
    _, on_path, pyenv = machine
    fake_python(on_path / "python3", 11)
    fake_python(pyenv / "versions" / "3.12.1" / "bin" / "python3.12", 12)
    newest = fake_python(pyenv / "versions" / "3.13.0" / "bin" / "python3.13", 13)
    assert choice(machine).stdout.strip() == str(newest)


def test_a_newer_python_on_path_wins_over_an_older_one_in_pyenv(machine):
    _, on_path, pyenv = machine
    on_path_313 = fake_python(on_path / "python3.13", 13)
    fake_python(pyenv / "versions" / "3.12.1" / "bin" / "python3.12", 12)
    assert choice(machine).stdout.strip() == str(on_path_313)


def test_without_python_3_12_it_says_what_it_needs(machine):
    _, on_path, _ = machine
    fake_python(on_path / "python3", 11)
    result = choice(machine)
    assert result.returncode == 1 and result.stdout == ""
    assert "meterproxy needs Python 3.12 or newer (mitmproxy 12)" in result.stderr


def test_the_suite_runs_on_python_3_12_or_newer():
    """What the bootstrap chose on this machine is what runs the tests."""
    assert sys.version_info >= (3, 12)
