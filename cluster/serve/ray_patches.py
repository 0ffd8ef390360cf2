"""What this service changes in Ray Serve 2.60, applied in every Ray worker by one
``worker_process_setup_hook`` (:func:`setup_worker`, passed to ``ray.init`` by
:class:`cluster.client.local.LocalService`). Both wrap Serve's own functions (they never copy
them) and are checked by served tests, so a Ray upgrade that breaks them fails loudly:

* **Loopback binding** (tests/serve/test_local_sockets.py): Serve's gRPC proxy
  (``ray/serve/_private/grpc_util.py`` ``start_grpc_server``) and each replica's
  inter-deployment gRPC server (``ray/serve/_private/replica.py`` ``_on_initialized``) bind
  ``[::]`` with no setting; :func:`bind_serve_servers` rebinds them to ``$MAGI_BIND_HOST``.
* **Bounded streams** (tests/serve/test_backpressure.py): Serve's router never passes Ray's
  per-call ``_generator_backpressure_num_objects`` on streaming calls
  (``ray/serve/_private/request_router/replica_wrapper.py``
  ``ActorReplicaWrapper.send_request_python``), so a replica's generator runs ahead of a
  reader that stopped, and the items pile up in the reader's process (the proxy for a gRPC
  client). :func:`bound_streams` makes every streaming call (and the always-streaming
  ``handle_request_with_rejection``) carry ``STREAM_OBJECTS`` (``$MAGI_STREAM_OBJECTS``):
  a replica's generator then waits at ``yield`` once that many items are not consumed. It
  only bounds a deployment whose user code runs on the replica's own loop
  (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``, set per deployment by
  :mod:`cluster.serve.app`); otherwise Serve copies every item into an unbounded queue first.
  The per-actor cap (``_actor_generator_backpressure_num_objects``) is no substitute: it makes
  one stalled stream block the replica's other streams.

Never imports ray at module level (``cluster.client.local`` imports it before ``ray.init``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

log = logging.getLogger(__name__)

BIND_HOST_ENV = "MAGI_BIND_HOST"  # read by bind_serve_servers in the workers
STREAM_OBJECTS_ENV = "MAGI_STREAM_OBJECTS"
STREAM_OBJECTS = 4  # items a streaming call may have produced and not consumed (default)
RAY_VERSION = "2.60.0"  # the Serve internals wrapped here are this version's (pinned in pyproject)
_STREAMING_METHODS = ("handle_request_streaming", "handle_request_with_rejection")


def setup_worker() -> None:
    """``worker_process_setup_hook`` of a local instance: :func:`bind_serve_servers` and
    :func:`bound_streams` (``$MAGI_STREAM_OBJECTS``, default ``STREAM_OBJECTS``; 0 = off)."""
    bind_serve_servers()
    objects = int(os.environ.get(STREAM_OBJECTS_ENV, STREAM_OBJECTS))
    if objects > 0:
        bound_streams(objects)


def bind_serve_servers() -> None:
    """Bind Serve's ``[::]`` gRPC servers to ``$MAGI_BIND_HOST`` (see the module docstring): both
    go through the two helpers wrapped here, which receive the address string. A no-op
    without the variable."""
    host = os.environ.get(BIND_HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl, replica  # noqa: PLC0415

    default_impl.add_grpc_address = _rebound(default_impl.add_grpc_address, host)
    replica.add_port_to_grpc_server = _rebound(replica.add_port_to_grpc_server, host)


def _rebound(add_port: Callable, host: str) -> Callable:
    bracketed = f"[{host}]" if ":" in host else host

    def add(server, address: str):
        return add_port(server, address.replace("[::]", bracketed, 1))

    return add


def bound_streams(objects: int) -> bool:
    """Make Serve's router in this process pass ``_generator_backpressure_num_objects=objects``
    on every streaming replica call (see the module docstring). Returns False (and logs why)
    on a Ray version other than ``RAY_VERSION``, whose internals may differ."""
    import ray  # noqa: PLC0415

    if ray.__version__ != RAY_VERSION:
        log.warning("ray %s, not %s: Serve streams left unbounded (cluster.serve.ray_patches)",
                    ray.__version__, RAY_VERSION)
        return False
    from ray.serve._private.request_router import replica_wrapper  # noqa: PLC0415

    cls = replica_wrapper.ActorReplicaWrapper
    original = getattr(cls.send_request_python, "__wrapped__", cls.send_request_python)

    def send_request_python(self, pr, *, with_rejection: bool):
        return original(_Bounded(self, objects), pr, with_rejection=with_rejection)

    send_request_python.__wrapped__ = original
    send_request_python.stream_objects = objects
    cls.send_request_python = send_request_python
    log.info("Serve streaming calls from this process carry _generator_backpressure_num_objects=%d", objects)
    return True


class _Bounded:
    """Stands in for a replica wrapper (or its actor handle) during one call: the streaming
    methods' ``options(...)`` get the per-call bound, everything else is the original's."""

    def __init__(self, inner: Any, objects: int):
        self._inner, self._objects = inner, objects

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name == "_actor_handle" or name in _STREAMING_METHODS:
            return _Bounded(value, self._objects)
        return value

    def options(self, **options: Any) -> Any:
        return self._inner.options(**options, _generator_backpressure_num_objects=self._objects)
