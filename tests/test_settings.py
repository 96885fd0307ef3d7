"""A setting that cannot take effect stops the gateway at start, with one line that names the
option and what it accepts (addons/settings.py); a good one still starts."""

import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, _start, _stop, run
from tests.leaks import LEAKS


def command(tmp_path: Path, *settings: str) -> list[str]:
    mitmdump = [str(Path(sys.executable).with_name("mitmdump")), "--listen-host", "127.0.0.1", "--listen-port", "0"]
    gateway = [
        "--set",
        f"confdir={tmp_path}",
        "-s",
        "addons/gateway.py",
        "--set",
        f"meterproxy_db={tmp_path / 'l.sqlite'}",
    ]
    return mitmdump + gateway + [part for setting in settings for part in ("--set", setting)]


@pytest.mark.parametrize(
    "setting, line",
    [
        (
            "meterproxy_attempts=abc",
            "--set meterproxy_attempts: Failed to parse option meterproxy_attempts: not an integer: abc; "
            "it takes a whole number",
        ),
        (
            "meterproxy_passthrough=publc",
            "--set meterproxy_passthrough: 'publc' is not one of its choices; it takes one of public, none, all",
        ),
        (
            "meterproxy_atempts=5",
            "--set meterproxy_atempts: no such meterproxy option (did you mean meterproxy_attempts?)",
        ),
    ],
)
def test_a_setting_that_cannot_take_effect_stops_the_gateway_with_one_line(tmp_path, setting, line):
    result = run(command(tmp_path, setting), cwd=ROOT, timeout=60)
    assert result.returncode == 1, result.stdout
    [error] = [text for text in result.stdout.splitlines() if "--set meterproxy" in text]
    assert line in error
    assert "Error logged during startup, exiting..." in result.stdout + result.stderr


def test_good_settings_still_start(tmp_path):
    process, _, output = _start(command(tmp_path, "meterproxy_attempts=5", "meterproxy_passthrough=none"), "listening")
    LEAKS.watch("the gateway of test_good_settings_still_start", lambda: "".join(output))
    _stop(process)
    assert process.returncode == 0 and "Error" not in "".join(output)
