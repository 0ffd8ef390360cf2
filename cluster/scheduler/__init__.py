"""Chunk planner and KV ring bookkeeping: plain Python, never imports torch or numpy.

- :mod:`cluster.scheduler.plan`: StepPlan / ChunkSlot / StepResult (the contract with the engine).
- :mod:`cluster.scheduler.chunk_scheduler`: ChunkScheduler, one per job (plan -> execute -> update).
- :mod:`cluster.scheduler.stagger`: the stateless stagger geometry (reference ``generate_sequences``).
- :mod:`cluster.scheduler.chunks`: chunk / frame arithmetic (video frames, latent frames, V2V prefix split).
"""
