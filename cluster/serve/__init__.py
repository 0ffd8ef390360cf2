"""Ray Serve deployments (thin shims over stages/ and cluster/engine/) and the app builder.

Modules: ``app`` (``build_app``), ``ingress`` (gRPC ``GrpcIngress``), ``text_encoder``,
``dit_engine``, ``vae_decoder`` (stage deployments), and the Ray-free helper
``validate`` (request -> JobSpec); a job's flow is :mod:`cluster.pipeline` (Ray-free).
"""
