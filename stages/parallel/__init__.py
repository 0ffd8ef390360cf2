"""Multi-GPU layout of the DiT: parameter counts per pipeline stage (:mod:`stages.parallel.weights`)
and context parallelism over torch.distributed.

The fit planner (does a model fit a GPU layout, how many jobs does the KV pool admit) lives in
:mod:`cluster.capacity`: it sizes the engine's KV pool with the engine's own arithmetic.
"""
