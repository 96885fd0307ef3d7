"""The first hour: `scripts/gateway --demo` with no key anywhere, its printed curl line and SDK
snippet run exactly as printed; the gateway's own hints run as printed; a misspelt provider id in
the providers file is one clear line."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from meterproxy.store import Store
from tests.harness import ROOT, _start, _stop


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def without_keys() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}


def printed_block(output: str, start: str, end: str) -> str:
    """The lines from the one that starts with `start` to the one that `end` matches, as printed."""
    match = re.search(rf"^{re.escape(start)}.*?{end}", output, re.MULTILINE | re.DOTALL)
    assert match, output
    return match.group(0)


def run_printed(command: str) -> str:
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=without_keys())
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_demo_works_with_no_key_as_printed(tmp_path):
    port = free_port()
    environment = {**without_keys(), "METERPROXY_PORT": str(port), "METERPROXY_DEMO_DIR": str(tmp_path / "demo")}
    environment.pop("METERPROXY_DB", None)
    process, _, output = _start(
        ["bash", "scripts/gateway", "--demo", "--set", f"confdir={tmp_path / 'mitmproxy'}"],
        rf"proxy listening at 127\.0\.0\.1:{port}",
        environment,
    )
    try:
        printed = "".join(output)
        assert "no provider key needed" in printed
        token = (tmp_path / "demo" / "token").read_text().strip()
        assert f"Bearer {token}'" in printed
        curl = printed_block(printed, "curl ", r"-d '[^\n]*'$")
        answer = json.loads(run_printed(curl))
        assert answer["id"].startswith("chatcmpl-fake")
        assert answer["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4"

        snippet = printed_block(printed, sys.executable + " - <<'EOF'", r"^EOF$")
        reply_id, text = run_printed(snippet).strip().split(" ", 1)
        assert reply_id.startswith("chatcmpl-fake") and text == "w0 w1 w2 w3 w4"

        store = Store(tmp_path / "demo" / "demo.sqlite")
        deadline = time.monotonic() + 10
        while (rows := store.recent_requests()) and rows[0]["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(row["status"], row["key_mode"], row["model"]) for row in rows] == [
            ("completed", "managed", "gpt-4o-mini"),
        ] * 2
        assert all(row["wallet_cost"] != "0.0000000000" for row in rows)
        store.close()
        fake_port = int(re.search(r"the fake provider at\s+http://127\.0\.0\.1:(\d+)", printed)[1])
    finally:
        _stop(process)
    deadline = time.monotonic() + 10  # the fake stops with the gateway
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", fake_port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the demo's fake provider still runs after the gateway stopped")


def test_the_hint_for_a_new_token_runs_as_printed(tmp_path):
    wrapper = ROOT / "scripts" / "meterproxy"
    db = tmp_path / "ledger.sqlite"
    run_printed(f"{wrapper} --db {db} quickstart")
    hint = run_printed(f"{wrapper} --db {db} quickstart").splitlines()[-1]
    assert hint == f"For a new development token: {wrapper} --db {db} quickstart --new"
    assert "merchant secret key  msk_" in run_printed(hint.split(": ", 1)[1])


def test_a_misspelt_provider_id_is_one_clear_line(tmp_path):
    providers = tmp_path / "providers.toml"
    providers.write_text('[providers.gemini]\nupstream = "http://127.0.0.1:9/google"\n')
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("mitmdump")),
            "--listen-port",
            "0",
            "-s",
            "addons/gateway.py",
            "--set",
            f"confdir={tmp_path}",
            "--set",
            f"meterproxy_db={tmp_path / 'ledger.sqlite'}",
            "--set",
            f"meterproxy_providers={providers}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if "providers file" in line]
    assert line.endswith(
        f"providers file {providers}: no built-in provider 'gemini' (did you mean google?): the built-in providers"
        " are openai, anthropic, google, mistral, deepseek, xai; a table for a new provider needs a base_url"
    )
