"""Devices the fit planner knows: device memory and FP8 support.

``memory_bytes`` is the device's total memory as ``nvidia-smi`` reports it (MiB x 2**20).
The part the driver keeps back and the CUDA context are *not* subtracted here: they are
explicit terms of the plan (:func:`cluster.capacity.fit.plan_fit` overheads), so an operator
can see and change them. FP8 (e4m3) matmuls (``torch._scaled_mm``, the reference flashinfer
``bmm_fp8``) need compute capability >= 8.9 (Ada, Hopper and later).

Besides the table: :func:`cuda_spec` turns what ``torch.cuda`` reports into a spec (a known
board by its device name, else the reported total memory), and :func:`host_spec` describes
host memory for a replica that runs on CPU (``kind="cpu"``: fp8 checkpoints run through the
dequantizing twin of :mod:`stages.dit.fp8`, no CUDA context).

Sources: NVIDIA product pages for capacity and compute capability; the MiB totals are the
``nvidia-smi`` figures of the respective boards (H100 SXM 81559 MiB, A100-SXM4-80GB
81920 MiB, RTX 4090 24564 MiB, H200 SXM 143771 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.units import GiB, MiB, format_bytes
from stages.errors import InvalidInput

FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type.

    Attributes:
        name: short key used in profiles (e.g. ``"rtx-4090"``).
        description: marketing name, for messages.
        memory_bytes: total device memory, bytes (``nvidia-smi`` total).
        compute_capability: (major, minor) CUDA compute capability ((0, 0) for a CPU).
        device_names: names ``torch.cuda.get_device_name`` reports for this board.
        kind: ``"cuda"`` or ``"cpu"`` (host memory of a CPU replica).
    """

    name: str
    description: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    device_names: tuple[str, ...] = ()
    kind: str = "cuda"

    @property
    def supports_fp8(self) -> bool:
        """True when fp8 checkpoints can run: e4m3 matmuls natively (compute capability >= 8.9),
        or on a CPU through the dequantizing twin."""
        return self.kind == "cpu" or tuple(self.compute_capability) >= FP8_MIN_CAPABILITY

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def __str__(self) -> str:
        if self.kind == "cpu":
            return f"{self.description} ({format_bytes(self.memory_bytes, 'GiB', 1)})"
        major, minor = self.compute_capability
        return f"{self.description} ({format_bytes(self.memory_bytes, 'GiB', 1)}, sm_{major}{minor})"


GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("h100-80gb-sxm", "NVIDIA H100 80GB HBM3 SXM", 81559 * MiB, (9, 0), ("NVIDIA H100 80GB HBM3",)),
        GpuSpec("h200", "NVIDIA H200 141GB HBM3e SXM", 143771 * MiB, (9, 0), ("NVIDIA H200",)),
        GpuSpec("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 24564 * MiB, (8, 9), ("NVIDIA GeForce RTX 4090",)),
        GpuSpec("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920 * MiB, (8, 0), ("NVIDIA A100-SXM4-80GB",)),
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


def cuda_spec(device_name: str, total_memory: int, capability: tuple[int, int]) -> GpuSpec:
    """The spec of a CUDA device as ``torch.cuda`` reports it: the known board whose
    ``device_names`` holds ``device_name``, else a spec with the reported total memory (bytes)."""
    for spec in GPUS.values():
        if device_name in spec.device_names:
            return spec
    return GpuSpec(f"cuda:{device_name}", device_name, int(total_memory), tuple(capability), (device_name,))


def host_spec(available_bytes: int, world_size: int = 1) -> GpuSpec:
    """Host memory of a CPU replica as a device: ``available_bytes`` (e.g. ``MemAvailable``)
    shared evenly by the replica's ``world_size`` rank processes (they run on one host).

    Raises:
        InvalidInput: ``world_size`` < 1 or no memory (field named).
    """
    if world_size < 1:
        raise InvalidInput("world_size", f"must be >= 1, got {world_size}")
    if available_bytes <= 0:
        raise InvalidInput("available_bytes", f"must be positive, got {available_bytes}")
    share = available_bytes // world_size
    per = f", 1/{world_size} per rank" if world_size > 1 else ""
    return GpuSpec("cpu", f"host memory (CPU, available{per})", share, (0, 0), kind="cpu")
