"""Every shell command of the README runs, as written, against a demo gateway.

A fenced shell block (```sh, ```bash, ```console, ```shell) must follow a marker line:
- `<!-- run -->`: run to completion with `bash -euo pipefail`, in the project's folder; it must
  exit 0. Blocks run in the README's order.
- `<!-- run: server -->`: a command that serves until stopped (the demo gateway): started in the
  background, waited for until it listens, stopped when the README's blocks have run.
- `<!-- run: collect -->`: `scripts/test`, run with `--collect-only -q` added (the suite cannot
  run itself; collecting proves the command sets up its environment and finds every test).

They run in a copy of the working tree (its `.venv` and Node packages linked, not copied), so
that what they leave (`.demo/`, `meterproxy.sqlite`) is the test's own; the gateway's ports
`127.0.0.1:8080` and `8081` (mitmweb's) are mapped onto free ports, `~` onto a folder of the
test's, and no provider key is in their environment. A server block stops the one before it.
"""

import os
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ROOT, _stop

README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- run(?:: (server|collect))? -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL = {"sh", "bash", "console", "shell"}
MAX_LINES = 250


@dataclass
class Block:
    line: int  # where the block starts, for messages
    kind: str  # "run", "server" or "collect"
    text: str


def shell_blocks(text: str) -> list[Block]:
    """The README's shell blocks; a shell block without its marker is an AssertionError."""
    blocks, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        if fence[1] in SHELL:
            marker = MARKER.match(lines[index - 1]) if index else None
            assert marker, f"README.md line {index + 1}: a shell block without a <!-- run --> marker"
            blocks.append(Block(index + 1, marker[1] or "run", "\n".join(lines[index + 1 : end])))
        index = end + 1
    return blocks


def test_every_shell_block_is_marked_and_the_readme_fits():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert shell_blocks(text)
    indented = [line for line in text.splitlines() if re.match(r"^ {4}(scripts/|python|mitm|curl)", line)]
    assert indented == [], "commands in indented blocks escape the test: fence and mark them"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LINKED = (".venv", "tests/node/node_modules")  # the environments, as set up by scripts/test


def working_copy(target: Path) -> Path:
    """The files git tracks or would track, as they are now, with the environments linked."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for name in LINKED:
        if (ROOT / name).exists():
            (target / name).symlink_to(ROOT / name)
    return target


class Session:
    """Where the README's commands run: a working copy, ports and a home of the test's own."""

    def __init__(self, tmp: Path) -> None:
        self.root = working_copy(tmp / "meterproxy")
        self.ports = {"8080": str(free_port()), "8081": str(free_port())}
        home = tmp / "home"
        home.mkdir()
        self.env = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
        for name in ("METERPROXY_DB", "METERPROXY_PORT", "METERPROXY_HOST", "METERPROXY_DEMO_DIR"):
            self.env.pop(name, None)
        self.env.update(HOME=str(home), BROWSER="true")  # mitmweb opens no browser
        self.servers: list[subprocess.Popen] = []

    def command(self, block: Block) -> str:
        text = re.sub(r"(127\.0\.0\.1|localhost):(8080|8081)\b", lambda m: f"{m[1]}:{self.ports[m[2]]}", block.text)
        text = re.sub(r"(--(?:listen|web)-port) (8080|8081)\b", lambda m: f"{m[1]} {self.ports[m[2]]}", text)
        return text + " --collect-only -q" if block.kind == "collect" else text

    def run(self, block: Block) -> str:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.command(block)],
            capture_output=True,
            text=True,
            cwd=self.root,
            env=self.env,
            timeout=300,
        )
        assert done.returncode == 0, f"README.md line {block.line}:\n{block.text}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def serve(self, block: Block) -> None:
        """Start a server block (the one before it stopped) and wait until it listens."""
        self.stop()
        environment = {**self.env, "METERPROXY_PORT": self.ports["8080"]}  # scripts/gateway's own default
        process = subprocess.Popen(
            ["bash", "-c", "exec " + self.command(block)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.root,
            env=environment,
        )
        self.servers.append(process)
        seen = []
        for line in process.stdout:
            seen.append(line)
            if re.search(r"(?i)proxy listening at", line):
                break
        else:
            raise AssertionError(f"README.md line {block.line}: {block.text} did not start:\n{''.join(seen)}")
        threading.Thread(target=process.stdout.read, daemon=True).start()  # never blocks on a full pipe

    def stop(self) -> None:
        while self.servers:
            _stop(self.servers.pop())


def test_every_shell_command_of_the_readme_runs(tmp_path):
    session = Session(tmp_path)
    try:
        for block in shell_blocks(README.read_text()):
            if block.kind == "server":
                session.serve(block)
            else:
                session.run(block)
    finally:
        session.stop()
