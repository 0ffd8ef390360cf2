"""Local mode listens on loopback only: every listening socket of the Ray processes it started."""

import ipaddress

import pytest
import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
import psutil  # noqa: E402

pytestmark = pytest.mark.serve


def listening(processes):
    """(process name, ip, port) of each listening TCP socket of ``processes``."""
    found = []
    for proc in processes:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def test_every_listener_of_the_local_service_is_on_loopback(service):
    me = psutil.Process()
    sockets = listening([me] + me.children(recursive=True))  # GCS, raylet, agents, workers, proxies
    assert service.grpc_port in {port for _, _, port in sockets}  # the service's own API port is seen
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
