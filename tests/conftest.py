from __future__ import annotations

import hashlib
import os
import resource
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from bridge.config import Settings, load_settings
from bridge.store import SessionStore
from bridge.web.app import create_app
from bridge.wiring import build_store
from tests.support.harness import PATIENT_TIMEOUTS, Kratos, RedisServer
from tests.support.kube import KubeAPI, require_binaries
from tests.support.topologies import ClusterSet, SentinelSet

SECRET = "test-secret-" + "x" * 40

# The suite ends holding about 1,800 descriptors (sockets the clients of the topologies and
# in-process bridges keep until collected), more than a soft limit of 1,024 allows: take
# what the hard limit gives, so a machine with the common default does not fail late.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < 65536 and (_hard == resource.RLIM_INFINITY or _soft < _hard):
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(_soft, min(_hard, 65536)), _hard))


KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its folder's kind; a test outside those folders is an
    error, so that ``-m unit`` can never quietly leave one out."""
    for item in items:
        kind = item.path.parent.name
        if kind not in KINDS or item.path.parent.parent != Path(__file__).parent:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(KINDS)}}}/")
        item.add_marker(kind)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The browser tests run Debian's Chromium (Playwright's own download is not used); where it
# is missing they are skipped, unless CI_REQUIRE_BROWSER (or CI, as for Helm, etcd and
# kube-apiserver) says a missing browser is a failure.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not (os.environ.get("CI_REQUIRE_BROWSER") or os.environ.get("CI")),
    reason="Debian's chromium is not installed (tests/run.sh installs it)",
)


@contextmanager
def chromium(*args: str, executable: str | None = CHROMIUM) -> Iterator[object]:
    """Chromium under Playwright, as the browser tests launch it, with ``args`` added."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu", *args]
        )
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, path: Path, **options: object) -> None:
    """Saves what ``page`` shows to ``path``, for people to look at; nothing asserts on it.
    A Chromium that cannot capture (its DevTools answers "Unable to capture screenshot" now
    and then on a loaded machine) costs the picture, with a warning, not the test."""
    from playwright.sync_api import Error

    try:
        page.screenshot(path=str(path), **options)
    except Error as error:
        first_line = error.message.partition("\n")[0]
        warnings.warn(f"no screenshot {path.name}: {first_line}", stacklevel=2)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests put their screenshots: $BRIDGE_SCREENSHOTS_DIR (tests/run.sh
    sets it; not committed), else a temporary folder."""
    named = os.environ.get("BRIDGE_SCREENSHOTS_DIR")
    folder = Path(named) if named else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sentinel_set(workdir: Path) -> Iterator[SentinelSet]:
    """A master, a replica and three Sentinels, shared by the session and steady: a test
    that fails it over builds a ``SentinelSet`` of its own, with fast failure detection."""
    topology = SentinelSet(workdir)
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def cluster_set(workdir: Path) -> Iterator[ClusterSet]:
    """A six-node Redis Cluster, shared by the session and steady: a test that fails it
    over builds a ``ClusterSet`` of its own, with fast failure detection."""
    topology = ClusterSet(workdir)
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def kube_api(workdir: Path) -> Iterator[KubeAPI]:
    """A real Kubernetes API server (etcd and kube-apiserver, no controllers) with the CRDs
    of the ingress controllers and the Prometheus operator installed, shared by the session.
    Outside CI, skipped when the binaries are missing (``bash tests/run.sh`` builds them)."""
    require_binaries()
    api = KubeAPI(workdir / "kube")
    try:
        api.install_crds()
        yield api
    finally:
        api.stop()


@dataclass(frozen=True)
class SharedStandalone:
    """The session's ``redis_server``, seen as a topology."""

    url: str
    kind: str = "standalone"


@pytest.fixture(scope="session", params=["standalone", "sentinel", "cluster"])
def redis_topology(request: pytest.FixtureRequest) -> SharedStandalone | SentinelSet | ClusterSet:
    """Each topology in turn (``.kind``, ``.url``), started when a test first needs it
    and the same one ``redis_server``, ``sentinel_set`` and ``cluster_set`` give."""
    if request.param == "standalone":
        return SharedStandalone(request.getfixturevalue("redis_server").url)
    return request.getfixturevalue(f"{request.param}_set")


def topology_url(kind: str, request: pytest.FixtureRequest) -> str | None:
    """The Redis URL of a store kind: none (embedded), the shared redis-server, or a
    Sentinel or Cluster set, started when first asked for."""
    if kind == "embedded":
        return None
    if kind == "standalone":
        return request.getfixturevalue("redis_server").url
    return request.getfixturevalue(f"{kind}_set").url


@pytest.fixture(scope="session")
def kratos(workdir: Path) -> Iterator[Kratos]:
    """Kratos with ``required_aal: aal1``: whoami answers aal1 sessions of 2FA users too."""
    server = Kratos(workdir, required_aal="aal1")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kratos_strict(workdir: Path) -> Iterator[Kratos]:
    """Kratos with ``required_aal: highest_available``: aal1 sessions of 2FA users get 403."""
    server = Kratos(workdir, required_aal="highest_available")
    yield server
    server.stop()


@pytest.fixture
def own_kratos(workdir: Path) -> Iterator[Kratos]:
    """A Kratos of the test's own, for tests that stop or pause it."""
    server = Kratos(workdir)
    yield server
    server.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix per test, so tests sharing one Redis never see each other's keys."""
    return "t" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10] + ":"


def bridge_env(kratos: Kratos, redis_url: str | None, prefix: str, **env: str) -> dict[str, str]:
    """A bridge's settings for ``kratos`` and ``redis_url`` (none: the embedded store),
    with the tests' ``PATIENT_TIMEOUTS`` and then ``env`` on top: for a bridge in process
    or a ``BridgeServer``."""
    values = {
        **PATIENT_TIMEOUTS,
        "BRIDGE_KRATOS_PUBLIC_URL": kratos.public_url,
        "BRIDGE_KRATOS_ADMIN_URL": kratos.admin_url,
        "BRIDGE_KEY_PREFIX": prefix,
        "BRIDGE_SECRET": SECRET,
        **env,
    }
    if redis_url:
        values["BRIDGE_REDIS_URL"] = redis_url
    return values


def bridge_settings(kratos: Kratos, redis_url: str | None, prefix: str, **env: str) -> Settings:
    return load_settings(bridge_env(kratos, redis_url, prefix, **env))


@pytest.fixture(params=["redis", "embedded"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(store_kind: str, kratos: Kratos, redis_server: RedisServer, prefix: str) -> Settings:
    return bridge_settings(kratos, redis_server.url if store_kind == "redis" else None, prefix)


@pytest.fixture
def store(settings: Settings) -> Iterator[SessionStore]:
    store = build_store(settings)
    yield store
    store.close()


@pytest.fixture
def client(settings: Settings, store: SessionStore) -> FlaskClient:
    """The bridge app (in-process) against the real Kratos and the store under test."""
    return create_app(settings, store).test_client(use_cookies=False)


@pytest.fixture
def make_client(store_kind: str, redis_server: RedisServer, prefix: str):
    """A bridge app with its own settings: ``make_client(kratos, BRIDGE_X="...")``."""

    def make(kratos: Kratos, **env: str) -> FlaskClient:
        redis_url = redis_server.url if store_kind == "redis" else None
        settings = bridge_settings(kratos, redis_url, prefix, **env)
        return create_app(settings).test_client(use_cookies=False)

    return make


def store_of(client: FlaskClient) -> SessionStore:
    return client.application.extensions["bridge"].store


def admin_of(client: FlaskClient) -> FlaskClient:
    """A test client of the admin listener's app, on the same bridge as ``client``."""
    from bridge.admin.api import create_admin_app

    return create_admin_app(client.application.extensions["bridge"]).test_client()
