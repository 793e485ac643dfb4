"""The CPU this process runs on, as far as int8 inference depends on it.

x86 int8 kernels (ONNX Runtime's MLAS, OpenVINO's oneDNN) multiply uint8 activations by int8
weights. With VNNI (``vpdpbusd``: AVX512-VNNI, or AVX-VNNI on newer desktop parts) the products
accumulate in int32 and the result is exact. Without it they use ``vpmaddubsw``, which adds each
*pair* of adjacent products in int16 **with saturation**: 255 x 127 + 255 x 127 = 64770 becomes
32767, silently. A u8 x s8 model is then exact on one CPU and wrong on another (measured on an
AVX2-only EPYC: 101 of 1,017 CIFAR-10 predictions of a w8a8 resnet20 changed; docs/quantization.md,
"int8 kernels and the CPU"). :func:`cpu_info` reads the flags that decide it; the integer
backends confirm the verdict with a probe of the runtime itself (:mod:`qrobust.integer.int8`).

:func:`keep_large_allocations` tunes glibc's allocator for torch on CPU, which has no caching
allocator: by default every block over 32 MB (a float64 twin activation of a 128-image batch)
is a fresh ``mmap`` whose pages fault in on first touch and go back to the kernel on free.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# flags worth recording for int8 inference (Linux /proc/cpuinfo names)
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
X86 = frozenset({"x86_64", "amd64", "i386", "i686"})


@dataclass(frozen=True)
class CpuInfo:
    """``arch`` (``platform.machine()``), ``model`` (the CPU's name), ``flags`` (the subset of
    :data:`INT8_FLAGS` it has; empty where they cannot be read)."""

    arch: str
    model: str
    flags: frozenset[str]

    @property
    def x86(self) -> bool:
        return self.arch.lower() in X86

    @property
    def vnni(self) -> bool:
        return bool(VNNI_FLAGS & self.flags)

    @property
    def u8s8_pairs_saturate(self) -> bool:
        """True where u8 x s8 kernels may add product pairs in saturating int16: x86 without
        VNNI (also when the flags could not be read: the safe assumption)."""
        return self.x86 and not self.vnni

    def to_dict(self) -> dict:
        return {"arch": self.arch, "model": self.model, "int8_flags": sorted(self.flags),
                "vnni": self.vnni}

    def describe(self) -> str:
        features = ", ".join(sorted(self.flags)) or "flags unknown"
        return f"{self.model} ({self.arch}: {features}{'' if self.vnni else '; no VNNI'})"


def parse_cpuinfo(text: str, arch: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of Linux's /proc/cpuinfo (its first processor)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    model = fields.get("model name") or fields.get("cpu model") or platform.processor() or arch
    return CpuInfo(arch, model, frozenset(flags & set(INT8_FLAGS)))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (cached; /proc/cpuinfo on Linux, else the name without flags)."""
    arch = platform.machine() or "unknown"
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"), arch)
    except OSError:
        return CpuInfo(arch, platform.processor() or arch, frozenset())


LARGE_ALLOCATION_BYTES = 1 << 30
# glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit): by default a
# block over this size is always a fresh mapping
GLIBC_MMAP_MAX_BYTES = 32 << 20
_kept: list[int] = []  # the threshold keep_large_allocations set in this process, if any


def keep_large_allocations(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Serve blocks up to ``threshold`` bytes from glibc's heap and keep freed memory there
    (``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD) instead of mapping fresh pages for
    each large tensor. Process-wide, so the command line calls it and a library import does
    not. Measured on PGD-10 against a w8a8 small-cnn twin (1 thread, batch 128): system time
    11 s -> 0.8 s of 35 s, twin/float cost 3.2x -> 2.2x. Returns False where there is no glibc
    (the setting is then left alone)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = bool(libc.mallopt(m_mmap_threshold, threshold)) and \
        bool(libc.mallopt(m_trim_threshold, 2 * threshold))
    if ok:
        _kept[:] = [threshold]
    return ok


def fresh_mapping_bytes() -> int | None:
    """Size above which this process's allocator maps every block afresh: glibc's default, or
    what :func:`keep_large_allocations` set; None without glibc."""
    try:
        ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return _kept[0] if _kept else GLIBC_MMAP_MAX_BYTES
