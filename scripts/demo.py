"""`scripts/gateway --demo`: the gateway with no provider key at all. Every built-in provider is
scripts/fake_provider.py (one process), the gateway holds demo managed keys that only ever go
to it, and a fresh demo ledger has a development account whose token the printed curl line and
OpenAI SDK snippet use. Stops the fake provider when the gateway stops."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from meterproxy.providers import BUILT_IN
from meterproxy.store import Store
from scripts.admin_commands import development_account, own_command

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = """{python} - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{gateway}/openai/v1", api_key="{token}")
reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}])
print(reply.id, reply.choices[0].message.content)
EOF"""


def providers_file(fake_url: str) -> str:
    """Every built-in provider's upstream is the fake's (its first path segment names the provider)."""
    return "".join(f'[providers.{provider.name}]\nupstream = "{fake_url}/{provider.name}"\n\n' for provider in BUILT_IN)


def demo_keys() -> dict[str, str]:
    """A managed key per provider, for the fake: no real key is needed, and none is used."""
    return {provider.key_env: f"demo-{provider.name}-key" for provider in BUILT_IN}


def banner(gateway: str, fake_url: str, db: Path, account: dict) -> str:
    names = ", ".join(provider.name for provider in BUILT_IN)
    snippet = SNIPPET.format(python=sys.executable, gateway=gateway, token=account["token"])
    return f"""
meterproxy demo: no provider key needed. Every provider ({names}) is the fake provider at
{fake_url} (scripts/fake_provider.py), and the gateway holds demo keys for them: answers are the
fake's ("w0 w1 w2 w3 w4", ids with "fake" in them), priced at real prices and charged to a demo
wallet of $10.00. Provider routes: {gateway}/openai/v1, {gateway}/anthropic, {gateway}/google, …

Try it with curl:
{account["curl"]}

Or with the OpenAI SDK:
{snippet}

The token is also in {db.with_name("token")} too. Then see the ledger:
{own_command()} --db {db} requests
"""


def start_fake() -> tuple[subprocess.Popen, str]:
    fake = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "fake_provider.py"), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    listening = re.search(r"listening at (\S+:\d+)", fake.stdout.readline())
    if listening is None:
        fake.terminate()
        raise SystemExit("meterproxy demo: the fake provider did not start")
    return fake, f"http://{listening[1]}"


def main(argv: list[str]) -> int:
    """`argv`: mitmdump's extra arguments."""
    host, port = os.environ.get("METERPROXY_HOST", "127.0.0.1"), os.environ.get("METERPROXY_PORT", "8080")
    gateway = f"http://{host}:{port}"
    state = Path(os.environ.get("METERPROXY_DEMO_DIR", ROOT / ".demo"))
    shutil.rmtree(state, ignore_errors=True)  # a fresh demo every time
    state.mkdir(parents=True)
    db, providers = state / "demo.sqlite", state / "providers.toml"
    fake, fake_url = start_fake()
    try:
        providers.write_text(providers_file(fake_url))
        store = Store(db)
        try:
            account = development_account(store, gateway)
        finally:
            store.close()
        (state / "token").write_text(account["token"] + "\n")  # for scripts: TOKEN=$(cat .demo/token)
        print(banner(gateway, fake_url, db, account), flush=True)
        command = [str(Path(sys.executable).with_name("mitmdump")), "--listen-host", host, "--listen-port", port]
        command += ["-s", str(ROOT / "addons" / "gateway.py"), "--set", f"meterproxy_db={db}"]
        command += ["--set", f"meterproxy_providers={providers}", *argv]
        environment = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
        gateway_process = subprocess.Popen(command, env={**environment, **demo_keys()})
        # Ctrl-C reaches the whole process group, the gateway and the fake stop by themselves;
        # a TERM to this process is passed on.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: gateway_process.terminate())
        return gateway_process.wait()
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
