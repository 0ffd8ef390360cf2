"""``magi serve`` stops gracefully on SIGTERM: new jobs refused, the running one finishes, no process left."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
import psutil  # noqa: E402

from cluster.client.local import free_port
from cluster.client.sdk import MagiClient, make_request
from cluster.serve.drain import SHUTTING_DOWN
from serve_helpers import poll

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[2]


def start_serve(port):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "proto"), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "cluster.client.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc, text, lines):
    """Read ``proc``'s output into ``lines`` until a line contains ``text`` (or the output ends)."""
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return True
    return False


def test_sigterm_drains_and_leaves_no_process():
    port = free_port()
    proc = start_serve(port)
    lines = []
    try:
        assert read_until(proc, "listening on", lines), "".join(lines)
        with MagiClient(f"127.0.0.1:{port}") as client:
            stream = client.generate(make_request("a kite over a hill", num_chunks=3, num_steps=4))
            messages = iter(stream)
            running = [next(m for m in messages if m.HasField("progress"))]
            serve_process = psutil.Process(proc.pid)
            family = [serve_process] + serve_process.children(recursive=True)  # Ray's processes
            proc.send_signal(signal.SIGTERM)
            assert read_until(proc, "draining", lines), "".join(lines)
            with pytest.raises(grpc.RpcError) as refused:
                list(client.generate(make_request("one too late")))
            draining_health = client.health(timeout=10.0)
            running += list(messages)  # the running job goes on to its end
        rest = threading.Thread(target=lambda: lines.extend(proc.stdout))
        rest.start()
        code = proc.wait(timeout=300)
        rest.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert code == 0, output
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details().startswith(SHUTTING_DOWN)
    assert draining_health == "NOT_SERVING"  # load balancers stop sending new calls here
    assert running[-1].HasField("done") and stream.done.num_chunks == 3
    assert "all streams finished" in output and "Traceback" not in output
    assert poll(lambda: not [p for p in family if _alive(p)]), [p for p in family if _alive(p)]


def _alive(proc) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
