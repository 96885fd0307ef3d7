#!/usr/bin/env python3
"""The mutation audit's changes, each applied alone to a copy of the project, and the tests that
must then fail (docs/mutation.md). Run with the project's venv: `python scripts/audit_mutants.py
[NAME ...]`. Exits non-zero if a change survives or the unchanged copy fails its tests."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIT = ["tests/test_pricing.py", "tests/test_usage_and_stream.py", "tests/test_ledger_core.py"]
ANTHROPIC_E2E = (
    "tests/test_providers_e2e.py::"
    "test_an_anthropic_stream_whose_message_delta_has_only_output_tokens_counts_the_cache_once"
)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # the end-to-end tests that must fail as well as a unit test


MUTANTS = [
    Mutant(
        "per-character rate not charged",
        "pricing/fees.py",
        " + (usage.input_characters + usage.output_characters) * self.character_rate",
        "",
        ("tests/test_metering_api.py::test_characters_and_seconds_are_charged_at_the_products_rates",),
    ),
    Mutant(
        "per-second rate not charged",
        "pricing/fees.py",
        " + (usage.input_seconds + usage.output_seconds) * self.second_rate",
        "",
        ("tests/test_metering_api.py::test_characters_and_seconds_are_charged_at_the_products_rates",),
    ),
    Mutant(
        "message_delta without input_tokens counts the cache twice",
        "meterproxy/usage.py",
        "previous.input_tokens - previous.cached_input_tokens - previous.cache_write_tokens",
        "previous.input_tokens",
        (ANTHROPIC_E2E,),
    ),
    Mutant(
        "message_delta without input_tokens counts cache writes twice",
        "meterproxy/usage.py",
        "previous.input_tokens - previous.cached_input_tokens - previous.cache_write_tokens",
        "previous.input_tokens - previous.cached_input_tokens",
        (ANTHROPIC_E2E,),
    ),
    Mutant(
        "hold not multiplied by n / candidateCount",
        "meterproxy/dialects.py",
        "None if not limit else limit * max(count(choices), 1)",
        "None if not limit else limit",
        ("tests/test_wallet_holds.py::test_a_hold_covers_every_choice_the_request_asks_for",),
    ),
    Mutant(
        "hold not multiplied by Gemini's candidateCount",
        "meterproxy/dialects.py",
        'config.get("maxOutputTokens"), config.get("candidateCount")',
        'config.get("maxOutputTokens")',
        ("tests/test_wallet_holds.py::test_a_hold_covers_every_choice_the_request_asks_for[gemini-candidateCount]",),
    ),
    Mutant(
        "a completed row completed again",
        "meterproxy/store.py",
        "WHERE request_id = ? AND status = 'pending' RETURNING held",
        "WHERE request_id = ? RETURNING held",
        (),
    ),
]


def copy_project(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def run_tests(copy: Path, tests: list[str]) -> bool:
    """Whether the tests pass in the copy: its modules come first on the path, in pytest and in
    every gateway process it starts."""
    environment = {**os.environ, "PYTHONPATH": str(copy)}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=copy, env=environment, capture_output=True).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these")
    names = parser.parse_args().names
    chosen = [mutant for mutant in MUTANTS if not names or any(name in mutant.name for name in names)]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="meterproxy-mutant-") as folder:
        copy = Path(folder)
        copy_project(copy)
        if not run_tests(copy, UNIT + sorted({test for mutant in chosen for test in mutant.tests})):
            print("the unchanged copy fails the tests: fix that first")
            return 2
        for mutant in chosen:
            source = copy / mutant.path
            original = source.read_text()
            assert original.count(mutant.old) == 1, f"{mutant.name}: the line to change is not in {mutant.path}"
            source.write_text(original.replace(mutant.old, mutant.new))
            verdicts = [("unit", not run_tests(copy, UNIT))]
            verdicts += [(test, not run_tests(copy, [test])) for test in mutant.tests]
            source.write_text(original)
            for where, killed in verdicts:
                print(f"{'killed  ' if killed else 'SURVIVED'} {mutant.name} ({where})", flush=True)
                failures += not killed
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
