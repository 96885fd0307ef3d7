import pytest

from tests.harness import FakeProvider, Gateway


@pytest.fixture(scope="session")
def fake():
    provider = FakeProvider()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def gateway(fake, tmp_path_factory):
    """One gateway per test module, as the state of its tests allows."""
    gateway = Gateway(tmp_path_factory.mktemp("gateway"), fake)
    yield gateway
    gateway.stop()


@pytest.fixture(autouse=True)
def _fresh_fake(request):
    """Each test sees only its own upstream requests and behaviours."""
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()
