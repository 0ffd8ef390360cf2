"""An outside client for the contract tests: raw request bytes over grpc generic calls.

It knows the method paths only (as server reflection gives them), not our SDK, so it
can send anything: truncated varints, bad UTF-8, 200 MB bodies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SERVICE = "magi.v1.VideoGeneration"
STREAMING = {"Generate"}
#: Things no status message may carry (issue 9.6): tracebacks, paths, IPs, pids, actor or
#: replica names/ids, private method names, Python exception class names.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/[a-z_]+/|\b\d{1,3}(\.\d{1,3}){3}\b|\bpid\b|[Aa]ctor|Replica|"
                   r"replica_|ray\.|\b_[a-z]\w+|\w+(Error|Exception)\b")
REQUEST_ID = re.compile(r" \(request id ([0-9A-Za-z_-]+)\)$")


@dataclass
class Outcome:
    """How one call ended: its status, details, and the response payloads received first."""

    code: grpc.StatusCode
    details: str
    messages: list[bytes] = field(default_factory=list)

    @property
    def request_id(self) -> str | None:
        match = REQUEST_ID.search(self.details or "")
        return match.group(1) if match else None


def call(channel: grpc.Channel, method: str, payload: bytes, *, service: str = SERVICE,
         timeout: float = 120.0, max_messages: int | None = None) -> Outcome:
    """Send ``payload`` to ``/service/method``; read at most ``max_messages`` stream messages
    (then cancel the call: Outcome code CANCELLED)."""
    path = f"/{service}/{method}"
    try:
        if method not in STREAMING:
            return Outcome(grpc.StatusCode.OK, "", [channel.unary_unary(path)(payload, timeout=timeout)])
        responses = channel.unary_stream(path)(payload, timeout=timeout)
        received = []
        for message in responses:
            received.append(message)
            if max_messages is not None and len(received) >= max_messages:
                responses.cancel()
                return Outcome(grpc.StatusCode.CANCELLED, "cancelled by the test", received)
        return Outcome(grpc.StatusCode.OK, "", received)
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", locals().get("received", []))


def replica_log_lines(pattern: str, needle: str) -> list[str]:
    """Lines containing ``needle`` in the Serve log files whose name matches ``pattern``
    (e.g. ``replica_magi_GrpcIngress_*``, ``proxy_*``) of this process's Ray session."""
    import ray._private.worker as worker  # noqa: PLC0415 - the driver's own Ray node

    logs = Path(worker._global_node.get_logs_dir_path()) / "serve"
    return [line for path in sorted(logs.glob(f"{pattern}.log"))
            for line in path.read_text(errors="replace").splitlines() if needle in line]


def process_rss(pid: int) -> int:
    """Resident set size of a process, bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(pid)


def actor_pid(class_name: str) -> int:
    """Pid of the live actor of class ``class_name`` in this process's Ray session (GCS actor table)."""
    from ray._private import state  # noqa: PLC0415 - the dashboard-free actor table

    pids = [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == class_name]
    if not pids:
        raise LookupError(class_name)
    return pids[0]
