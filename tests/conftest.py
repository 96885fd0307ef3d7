import pytest
from mitmproxy.test import taddons

from tests.backends import BACKENDS, ledger_target
from tests.harness import FakeProvider, Gateway
from tests.leaks import _no_secret_left_behind, pytest_configure  # noqa: F401 (the key-leak search)


@pytest.fixture(scope="session")
def fake():
    provider = FakeProvider()
    yield provider
    provider.stop()


def pytest_generate_tests(metafunc):
    """A module that sets ON_BOTH_BACKENDS runs each test that uses `backend` (its `gateway`,
    say) on SQLite and on PostgreSQL, with one gateway per backend."""
    if getattr(metafunc.module, "ON_BOTH_BACKENDS", False) and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request) -> str:
    """The ledger backend of a module's gateway: SQLite, unless the module sets ON_BOTH_BACKENDS."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="module")
def gateway(fake, backend, tmp_path_factory):
    """One gateway per test module, as the state of its tests allows."""
    folder = tmp_path_factory.mktemp("gateway")
    gateway = Gateway(folder, fake, db=ledger_target(backend, folder))
    yield gateway
    gateway.stop()


@pytest.fixture(autouse=True)
def _fresh_fake(request):
    """Each test sees only its own upstream requests and behaviours."""
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


@pytest.fixture(autouse=True, scope="session")
def _taddons_contexts_leave_no_log_handler():
    """mitmproxy 12's `taddons.context` closes the event loop it made on exit but leaves its
    master's log handler installed, and a later log line of the same test fails on the closed loop:
    each context takes its handler with it."""
    original_exit = taddons.context.__exit__

    def exit_and_uninstall(self, *exc_info):
        self.master._legacy_log_events.uninstall()
        return original_exit(self, *exc_info)

    taddons.context.__exit__ = exit_and_uninstall
    yield
    taddons.context.__exit__ = original_exit


@pytest.fixture(params=BACKENDS)
def ledger(request, tmp_path) -> str:
    """An empty ledger on each backend in turn: a SQLite file or a PostgreSQL database."""
    return ledger_target(request.param, tmp_path)
