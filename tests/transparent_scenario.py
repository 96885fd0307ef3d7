"""Transparent mode and local capture end to end, run by tests/test_proxy_mode.py inside a
private network and mount namespace (`unshare --net --mount`), so nothing here touches the
machine's own network.

In the namespace api.openai.com resolves (through a private /etc/hosts) to 10.99.0.1. With
`transparent` (the default), iptables redirects TCP to 10.99.0.1:443 to a `mitmdump --mode
transparent` gateway; with `local`, the gateway runs `--mode local:legacy-client` and mitmproxy's
own redirector captures the connections of the process of that name. An openai SDK client that
knows nothing of the proxy (trusting mitmproxy's CA, as a deployment would) calls
https://api.openai.com; the gateway reaches the fake provider on loopback through the providers
file. Prints a JSON report of what the client got, what upstream saw and the row; hands its
secrets and its gateway's traces to the session's key-leak search (tests/leaks.py).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402

from tests.harness import FakeProvider, Gateway, make_account  # noqa: E402

PROVIDER_ADDRESS = "10.99.0.1"


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def call_openai(token: str) -> dict:
    """The legacy client's call: what it got."""
    client = openai.OpenAI(api_key=token, max_retries=0)  # base_url: https://api.openai.com/v1
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "who is listening"}]
    )
    completion = raw.parse()
    return {
        "content": completion.choices[0].message.content,
        "usage": completion.usage.model_dump(),
        "request_id": raw.headers["x-lava-request-id"],
    }


def as_legacy_client(tmp: Path, token: str) -> dict:
    """The same call from a process of its own named `legacy-client`, which local capture targets."""
    named = tmp / "legacy-client"
    named.symlink_to(sys.executable)
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    code += f"from transparent_scenario import call_openai; print(json.dumps(call_openai({token!r})))"
    done = subprocess.run([str(named), "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


def main(mode: str) -> None:
    tmp = Path(tempfile.mkdtemp())
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", f"{PROVIDER_ADDRESS}/32", "dev", "lo")
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{PROVIDER_ADDRESS} api.openai.com\n")
    run("mount", "--bind", str(hosts), "/etc/hosts")

    fake = FakeProvider()
    if mode == "local":
        gateway = Gateway(tmp, fake, args=("--mode", "regular", "--mode", "local:legacy-client"))
    else:
        gateway = Gateway(tmp, fake, args=("--mode", "transparent"))
    try:
        if mode == "transparent":
            redirect = (
                f"-t nat -A OUTPUT -p tcp -d {PROVIDER_ADDRESS} --dport 443 -j REDIRECT --to-ports {gateway.port}"
            )
            run("iptables", *redirect.split())
        account = make_account(gateway.store)
        os.environ["SSL_CERT_FILE"] = str(gateway.ca_cert)
        got = as_legacy_client(tmp, account.token()) if mode == "local" else call_openai(account.token())
        report = {
            **got,
            "upstream": fake.requests(),
            "row": gateway.row(got["request_id"]),
            "connection_id": account.connection_id,  # its secrets stay here: they are handed off
        }
        print(json.dumps(report))
    finally:
        gateway.stop()
        fake.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "transparent")
