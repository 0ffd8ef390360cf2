"""GPU types the fit planner knows: device memory and FP8 support.

``memory_bytes`` is the device's total memory as ``nvidia-smi`` reports it (MiB x 2**20).
The part the driver keeps back and the CUDA context are *not* subtracted here: they are
explicit terms of the plan (:class:`stages.parallel.fit.Overheads`), so an operator can see
and change them. FP8 (e4m3) matmuls (``torch._scaled_mm``, the reference flashinfer
``bmm_fp8``) need compute capability >= 8.9 (Ada, Hopper and later).

Sources: NVIDIA product pages for capacity and compute capability; the MiB totals are the
``nvidia-smi`` figures of the respective boards (H100 SXM 81559 MiB, A100-SXM4-80GB
81920 MiB, RTX 4090 24564 MiB, H200 SXM 143771 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.errors import InvalidInput

MiB = 1 << 20
GiB = 1 << 30
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type.

    Attributes:
        name: short key used in profiles (e.g. ``"rtx-4090"``).
        description: marketing name, for messages.
        memory_bytes: total device memory, bytes (``nvidia-smi`` total).
        compute_capability: (major, minor) CUDA compute capability.
    """

    name: str
    description: str
    memory_bytes: int
    compute_capability: tuple[int, int]

    @property
    def supports_fp8(self) -> bool:
        """True when e4m3 matmuls run natively (compute capability >= 8.9)."""
        return tuple(self.compute_capability) >= FP8_MIN_CAPABILITY

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def __str__(self) -> str:
        major, minor = self.compute_capability
        return f"{self.description} ({self.memory_gib:.1f} GiB, sm_{major}{minor})"


GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("h100-80gb-sxm", "NVIDIA H100 80GB HBM3 SXM", 81559 * MiB, (9, 0)),
        GpuSpec("h200", "NVIDIA H200 141GB HBM3e SXM", 143771 * MiB, (9, 0)),
        GpuSpec("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 24564 * MiB, (8, 9)),
        GpuSpec("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920 * MiB, (8, 0)),
    )
}


def get_gpu(name: str | GpuSpec, field: str = "gpu") -> GpuSpec:
    """Look up a GPU type by key (case-insensitive); a :class:`GpuSpec` passes through.

    Raises:
        InvalidInput: unknown key (``field`` named; the message lists the known keys).
    """
    if isinstance(name, GpuSpec):
        return name
    spec = GPUS.get(str(name).lower())
    if spec is None:
        raise InvalidInput(field, f"unknown GPU type {name!r}; known: {sorted(GPUS)}")
    return spec
