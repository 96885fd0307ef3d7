"""The key-leak search (SPEC §2): no key, secret or forward token is ever written to the ledger, a
log line or a response. A pytest plugin (tests/conftest.py loads it): every secret a test hands to
a process and everything a gateway, a command or a subprocess leaves behind are registered with
`LEAKS` as the session goes, and the session's end searches all of the latter for all of the
former, so that no test file has to run last. A secret is searched as it is and as it may be
escaped: URL-encoded, JSON-escaped and inside base64 (at each of the three alignments).

A process that is not the session (a scenario run in a namespace, say) hands what it registered
to the session through the folder in $METERPROXY_LEAK_HANDOFF when it exits."""

import atexit
import base64
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

HANDOFF = "METERPROXY_LEAK_HANDOFF"
SHORTEST_SECRET = 8  # anything shorter would be found by chance
BLOCK = 10  # the search compares aligned blocks of this many bytes first (see `LeakCollector.leaks`)
Source = Callable[[], bytes | str]


def escaped_forms(secret: str) -> dict[bytes, str]:
    """The byte strings that would show the secret, each with how it is written."""
    raw = secret.encode()
    url = quote(secret, safe="")
    forms = [
        ("as is", raw),
        ("URL-encoded", url.encode()),
        ("URL-encoded, lower-case hex", re.sub(r"%[0-9A-F]{2}", lambda escape: escape[0].lower(), url).encode()),
        ("form-encoded", quote_plus(secret, safe="").encode()),
        ("JSON-escaped", json.dumps(secret)[1:-1].encode()),
        ("JSON-escaped, slashes too", json.dumps(secret)[1:-1].replace("/", "\\/").encode()),
        ("JSON-escaped, as UTF-8", json.dumps(secret, ensure_ascii=False)[1:-1].encode()),
    ]
    for alignment in range(3):  # where the secret starts in the encoded bytes' groups of three
        padded = b"\0" * alignment + raw
        start = 4 if alignment else 0  # the first group holds some of what comes before
        end = len(padded) // 3 * 4  # a last group short of three holds some of what comes after
        forms += [("in base64", base64.b64encode(padded)[start:end])]
        forms += [("in URL-safe base64", base64.urlsafe_b64encode(padded)[start:end])]
    found: dict[bytes, str] = {}
    for label, form in forms:
        if len(form) >= SHORTEST_SECRET:
            found.setdefault(form, label)
    return found


@dataclass(frozen=True)
class Leak:
    source: str
    secret: str
    form: str

    def __str__(self) -> str:
        return f"{self.secret[:6]}… ({self.form}) in {self.source}"


class LeakCollector:
    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.sources: dict[str, Source] = {}
        self.owner = False  # the pytest session, which searches; other processes hand off to it

    def secret(self, value: str) -> str:
        if len(value) < SHORTEST_SECRET:
            raise ValueError(f"a secret of fewer than {SHORTEST_SECRET} characters would be found by chance")
        self.secrets.add(value)
        return value

    def watch(self, name: str, source: Source) -> None:
        """`source` gives, when the search runs, what a process left behind (read then, not now:
        a process goes on writing)."""
        self.sources[f"{name} #{len(self.sources)}"] = source

    def leaks(self) -> list[Leak]:
        """Each source is cut into aligned blocks of BLOCK bytes, once; a form of 2 × BLOCK - 1
        bytes or more covers at least one such block wherever it is, so only the forms that have
        one of those blocks among theirs are looked for. Shorter forms are looked for directly."""
        forms: dict[bytes, tuple[str, str]] = {}
        for value in sorted(self.secrets):
            forms.update({form: (value, label) for form, label in escaped_forms(value).items()})
        by_block: dict[bytes, list[bytes]] = {}
        short = []
        for form in forms:
            if len(form) < 2 * BLOCK - 1:
                short.append(form)
            for start in range(len(form) - BLOCK + 1):
                by_block.setdefault(form[start : start + BLOCK], []).append(form)
        found = []
        for name, source in self.sources.items():
            text = source()
            data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
            candidates = {form for block in _blocks(data) & by_block.keys() for form in by_block[block]}
            for form in sorted(candidates | set(short)):
                if form in data:
                    found.append(Leak(name, *forms[form]))
        return found

    def hand_off(self, folder: str) -> None:
        """Write what this process registered for the session's search."""
        sources = {name: _text(source()) for name, source in self.sources.items()}
        report = {"secrets": sorted(self.secrets), "sources": sources}
        Path(folder, f"{os.getpid()}.json").write_text(json.dumps(report))

    def take_over(self, folder: str) -> None:
        """What the processes that handed off registered."""
        for report in sorted(Path(folder).glob("*.json")):
            handed = json.loads(report.read_text())
            self.secrets.update(handed["secrets"])
            for name, text in handed["sources"].items():
                self.watch(f"{name} (process {report.stem})", lambda text=text: text)


def _blocks(data: bytes) -> set[bytes]:
    """The aligned blocks of `data`, a few megabytes at a time (a 64 MB stream is recorded)."""
    step = BLOCK * 400_000
    blocks: set[bytes] = set()
    for offset in range(0, len(data), step):
        blocks.update(_BLOCK.findall(data, offset, offset + step))
    return blocks


_BLOCK = re.compile(b".{%d}" % BLOCK, re.DOTALL)


def _text(content: bytes | str) -> str:
    return content if isinstance(content, str) else content.decode("utf-8", "surrogateescape")


LEAKS = LeakCollector()


# --- the pytest plugin ------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """This process is the session: its subprocesses hand off to it."""
    LEAKS.owner = True
    os.environ[HANDOFF] = tempfile.mkdtemp(prefix="meterproxy-leaks-")


@pytest.fixture(scope="session", autouse=True)
def _no_secret_left_behind():
    """After every other fixture of the session is gone (gateways stopped, files complete)."""
    yield
    LEAKS.take_over(os.environ[HANDOFF])
    leaks = LEAKS.leaks()
    if leaks:
        pytest.fail("secrets left behind:\n" + "\n".join(sorted(map(str, leaks))), pytrace=False)


def _hand_off_at_exit() -> None:
    if not LEAKS.owner and os.environ.get(HANDOFF) and (LEAKS.secrets or LEAKS.sources):
        LEAKS.hand_off(os.environ[HANDOFF])


atexit.register(_hand_off_at_exit)
