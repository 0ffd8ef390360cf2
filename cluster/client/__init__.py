"""gRPC client SDK (:mod:`cluster.client.sdk`), the ``magi`` CLI (:mod:`cluster.client.cli`)
and the embedded local service (:mod:`cluster.client.local`)."""

from cluster.client.sdk import GenerateStream, MagiClient, make_request

__all__ = ["GenerateStream", "MagiClient", "make_request"]
