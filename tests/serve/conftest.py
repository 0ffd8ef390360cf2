"""One real Ray + Serve instance (loopback, magi-tiny) shared by the serve tests of a session."""

import pytest

from cluster.client.local import LocalService
from cluster.client.sdk import MagiClient
from cluster.config import EngineSettings, RequestLimits, ServiceConfig

#: Small limits so the tests exercise them cheaply: 256 KiB parts split raw chunks
#: (128x128x24x3 = 1.2 MB) into several messages; a 28-frame V2V prefix = one whole
#: prefix chunk (24 frames) + one leftover latent frame; two jobs fill the engine.
SERVE_TEST_CONFIG = ServiceConfig(
    max_message_bytes=256 * 1024,
    limits=RequestLimits(max_chunks=32, max_prefix_frames=28),
    engine=EngineSettings(max_active_jobs=2, queue_limit=0),  # a third concurrent job is refused
)


@pytest.fixture(scope="session")
def service():
    with LocalService(SERVE_TEST_CONFIG) as svc:
        yield svc


@pytest.fixture()
def client(service):
    with MagiClient(service.address) as c:
        yield c


def _handle(name: str):
    from ray import serve

    from cluster.serve.app import APP_NAME

    return serve.get_deployment_handle(name, app_name=APP_NAME)


@pytest.fixture()
def dit_engine(service):
    """Handle of the DiTEngine deployment (job_stats, active_jobs, engine_stats)."""
    return _handle("DiTEngine")


@pytest.fixture()
def vae_decoder(service):
    """Handle of the VaeDecoder deployment (decode_intervals)."""
    return _handle("VaeDecoder")


class Collected:
    """A finished stream: its messages in order and each chunk's reassembled payload."""

    def __init__(self, messages):
        self.messages = messages
        self.kinds = [m.WhichOneof("event") for m in messages]
        self.accepted = messages[0].accepted
        self.done = messages[-1].done
        self.payloads: dict[int, bytes] = {}
        for m in messages:
            if m.HasField("chunk"):
                self.payloads[m.chunk.index] = self.payloads.get(m.chunk.index, b"") + m.chunk.data

    def data(self) -> bytes:
        return b"".join(self.payloads[i] for i in sorted(self.payloads))


@pytest.fixture()
def run_job(client):
    """``run_job(request) -> Collected`` (raises grpc.RpcError on a failed call)."""

    def run(request):
        return Collected(list(client.generate(request)))

    return run


def pytest_collection_modifyitems(config, items):
    """Ray Serve's own pydantic-v1-style models warn on import; not ours to fix."""
    for item in items:
        if "tests/serve/" in str(item.fspath):
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"))
