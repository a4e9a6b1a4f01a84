"""Which floating-point precision to compute in: bf16 only where the hardware computes it fast.

On a GPU, bf16 is KaLM's training precision (METHOD.md §4). On a CPU it depends on the instruction set: with AMX or
AVX-512-BF16, bf16 matrix products are 2-3x faster than fp32; on an AVX2-only CPU (many laptops and servers) they are
about 100x *slower* (1024 x 1024 matmul on 2 threads: 0.8 GFLOP/s in bf16, 112 in fp32; ENVIRONMENT.md). So ``auto``
means: bf16 on a CUDA device that supports it, bf16 autocast on a CPU only where :func:`cpu_bf16_is_fast`, fp32
elsewhere. An explicit bf16 request is honoured, with a warning on a CPU where it is slow.

:func:`cpu_isa` is the one capability query (tests replace it to play an AVX2-only or an AMX CPU). It reads
``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY`` (so
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` makes an AMX machine answer like an
AVX2-only one), plus the CPU's bf16 extensions. For a CPU that is neither x86 AVX2 nor AVX-512 (ARM, ...), a one-off
micro-benchmark (bf16 against fp32 matrix products, cached per process) decides.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Literal

import torch

logger = logging.getLogger(__name__)

BF16Setting = bool | Literal["auto"]

_FAST_BF16_ISAS = frozenset({"AMX", "AVX512_BF16"})
_SLOW_BF16_ISAS = frozenset({"AVX512", "AVX2", "DEFAULT"})


def cpu_isa() -> str:
    """The CPU's vector instruction set as far as bf16 is concerned.

    ``"AMX"`` or ``"AVX512_BF16"`` (bf16 in hardware), ``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, or another value of
    ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``"SVE256"`` on ARM).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return capability
    # oneDNN runs bf16 matmuls; an ISA cap below AVX-512-BF16 (the emulation variables) makes them slow again.
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    if onednn_cap and not ("AMX" in onednn_cap or "BF16" in onednn_cap or onednn_cap == "ALL"):
        return "AVX512"
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512_BF16"
    return "AVX512"


def _bf16_matmul_is_faster(size: int = 256, repeats: int = 3) -> bool:
    """Micro-benchmark: is a bf16 ``size x size`` matmul faster than the fp32 one on this CPU?"""

    def best_time(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up (kernel selection, allocation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_time(torch.bfloat16) < best_time(torch.float32)


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """True where this CPU computes bf16 faster than fp32 (AMX, AVX-512-BF16, or a benchmark says so). Cached."""
    isa = cpu_isa()
    if isa in _FAST_BF16_ISAS:
        fast, how = True, f"CPU capability {isa}"
    elif isa in _SLOW_BF16_ISAS:
        fast, how = False, f"CPU capability {isa} (no bf16 in hardware)"
    else:
        fast, how = _bf16_matmul_is_faster(), f"micro-benchmark on CPU capability {isa}"
    logger.info("bf16 on this CPU: %s (%s)", "fast, used for 'auto'" if fast else "slow, 'auto' uses fp32", how)
    return fast


def use_bf16(setting: BF16Setting, *, cuda: bool | None = None, what: str = "bf16") -> bool:
    """Resolve a bf16 switch (``True``, ``False`` or ``"auto"``) for the device the work runs on.

    Args:
        setting: ``"auto"``: bf16 on a CUDA device that supports it, on a CPU only where :func:`cpu_bf16_is_fast`.
            ``True`` is honoured everywhere (with a warning on a CPU where bf16 is slow); ``False`` is fp32.
        cuda: Whether the work runs on a CUDA device; default: ``torch.cuda.is_available()``.
        what: Name of the setting for messages (e.g. ``"args.bf16"``).

    Raises:
        ValueError: ``setting`` is none of ``True``, ``False``, ``"auto"``.
    """
    if setting not in (True, False, "auto"):
        raise ValueError(f"{what} must be true, false or 'auto', got {setting!r}")
    on_cuda = torch.cuda.is_available() if cuda is None else cuda
    if setting == "auto":
        if on_cuda:
            return bool(torch.cuda.is_bf16_supported())
        return cpu_bf16_is_fast()
    if setting and not on_cuda and not cpu_bf16_is_fast():
        logger.warning(
            "%s=true on a CPU without fast bf16 (capability %s): bf16 runs far slower than fp32 here; "
            "use 'auto' to pick fp32 on such CPUs",
            what,
            cpu_isa(),
        )
    return bool(setting)


def cpu_autocast(setting: BF16Setting = "auto") -> torch.autocast:
    """A CPU bf16 autocast context, enabled per :func:`use_bf16` (``"auto"``: only where bf16 is fast)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(setting, cuda=False, what="cpu autocast"))


__all__ = ["cpu_autocast", "cpu_bf16_is_fast", "cpu_isa", "use_bf16"]
