"""The native row kernel of `eah_interp.chunked` on CPU: built once per machine, PyTorch otherwise.

``csrc/attention_rows.c`` computes, for one chunk of attention logits, the unnormalised softmax
rows, their totals, the sums the entropy needs and the column sums, in one sweep per row (the
row stays in L1 cache between its passes); in PyTorch the same takes five passes over the chunk
(`eah_interp.chunked`, which is also what runs on other devices and when the kernel is unavailable).

The kernel is compiled on first use with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``; about 0.3 s) into ``cache_dir()/native`` and loaded with ctypes: nothing is downloaded,
nothing is built at install time. The build is keyed by the source, the compiler, its flags and the
CPU, so a shared home directory with different machines gets one build per CPU. If there is no
compiler or the build fails, a warning says so once and the PyTorch path runs (same results).
``EAH_INTERP_NATIVE=0`` turns the kernel off; `status` tells what is in use.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from eah_interp.cache import cache_dir

SOURCE = Path(__file__).resolve().parent / "csrc" / "attention_rows.c"

#: Vectorising flags without ``-ffast-math`` (which, in a shared library built by GCC < 13, switches the
#: whole process to flush-to-zero when loaded): reassociation for the reductions, no errno, no traps.
PORTABLE_FLAGS = (
    "-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
    "-fassociative-math", "-ffinite-math-only",
)
#: Tried first: the machine's own vector width (AVX-512 where there is one).
NATIVE_FLAGS = ("-march=native", "-mprefer-vector-width=512")
#: Matrices split over torch's threads. PyTorch's Linux wheels ship ``libgomp.so.1``, and a library
#: linked against that name reuses the copy already loaded, so the kernel shares PyTorch's thread pool.
OPENMP_FLAGS = ("-fopenmp",)
#: Tried in this order until one builds (a compiler without OpenMP or without those x86 flags still gets
#: a serial, portable build).
FLAG_SETS = (
    PORTABLE_FLAGS + NATIVE_FLAGS + OPENMP_FLAGS,
    PORTABLE_FLAGS + OPENMP_FLAGS,
    PORTABLE_FLAGS + NATIVE_FLAGS,
    PORTABLE_FLAGS,
)


class NativeBuildError(RuntimeError):
    """The C compiler could not build the kernel (its message is attached)."""


def enabled() -> bool:
    """False when ``EAH_INTERP_NATIVE`` is ``0``, ``off``, ``false`` or ``no``."""
    return os.environ.get("EAH_INTERP_NATIVE", "1").strip().lower() not in {"0", "off", "false", "no"}


def _compiler() -> list[str]:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise NativeBuildError("no C compiler found (set $CC, or install gcc or clang)")


def has_compiler() -> bool:
    """Whether a C compiler is there to build the kernel (``$CC``, ``cc``, ``gcc`` or ``clang``)."""
    try:
        return shutil.which(_compiler()[0]) is not None
    except NativeBuildError:
        return False


def _cpu_signature() -> str:
    """What the build depends on besides the source: the machine type and, on Linux, the CPU flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def build(directory: Path | None = None) -> Path:
    """Compile the kernel into ``directory`` (default ``cache_dir()/native``) unless already there.

    Returns:
        The shared library's path.

    Raises:
        NativeBuildError: no compiler, or every flag set failed (the compiler's last message attached).
    """
    directory = (directory or cache_dir() / "native").expanduser()
    compiler = _compiler()
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"C compiler {compiler[0]!r} does not run: {e}") from e
    source = SOURCE.read_bytes()
    message = ""
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        target = directory / f"attention_rows{'-openmp' if OPENMP_FLAGS[0] in flags else ''}-{key}.so"
        if target.exists():
            return target
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:  # built aside, then moved in whole
            built = Path(tmp) / target.name
            done = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(built)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(built, target)
                return target
            message = done.stderr.strip()[-2000:]
    raise NativeBuildError(f"{compiler[0]} failed to build {SOURCE.name}: {message}")


@functools.cache
def _kernel() -> ctypes._CFuncPtr | str:
    """The loaded C function (its library path in ``.path``), or why there is none (warned once)."""
    if not enabled():
        return "turned off by EAH_INTERP_NATIVE"
    try:
        path = build()
        library = ctypes.CDLL(str(path))  # CDLL: calls release the GIL
    except (NativeBuildError, OSError, subprocess.SubprocessError) as e:
        reason = f"unavailable ({e})"
        warnings.warn(f"eah-interp: the native attention kernel is {reason}; the PyTorch path runs instead "
                      "(same results, slower on CPU).", RuntimeWarning, stacklevel=3)
        return reason
    function = library.attention_rows
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    function.argtypes = [p, p, i, i, i, p, i, f, f, p, p, p, i, i, ctypes.c_int]
    function.restype = None
    function.path = path
    return function


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return not isinstance(_kernel(), str)


def status() -> str:
    """One line: the library in use, or why the PyTorch path runs."""
    kernel = _kernel()
    return f"native kernel: {kernel}" if isinstance(kernel, str) else f"native kernel: loaded from {kernel.path}"


def attention_rows(
    logits: Float[Tensor, "n rows cols"],
    exps: Float[Tensor, "n rows cols"],
    weights: Float[Tensor, "n rows"],
    column_sums: Float[Tensor, "n k"],
    diagonal_start: int,
    log_floor: float,
    masked_from: int = 0,
) -> tuple[Float[Tensor, "n rows"], Float[Tensor, "n rows"]]:
    """The kernel on one chunk (CPU float32, ``logits`` and ``exps`` contiguous; check `available` first).

    Masked logits must hold the float32 minimum (anything below half of it counts as masked). The
    ``n`` matrices are split over ``torch.get_num_threads()`` threads when the build has OpenMP.

    Args:
        logits: the chunk's scaled, masked logits; left unchanged.
        exps: written: ``exp(max(x - row max, log_floor))``, exactly 0 where masked.
        weights: each row's weight in the column sums (rows may be strided, the last dim contiguous).
        column_sums: ``[n, k]`` with ``k >= cols``, contiguous rows; ``weight / total * exps`` is added
            to its first ``cols`` columns, except at each row's own key ``diagonal_start + row``.
        diagonal_start: the key index of row 0.
        log_floor: the clamp of ``x - row max``.
        masked_from: unused (the kernel tests every entry at no extra cost); there for the signature of
            `eah_interp.chunked.attention_rows`, which uses it.

    Returns:
        ``(totals, ylogu)``: each row's ``sum exps`` and ``sum exps * max(x - row max, log_floor)``.
    """
    kernel = _kernel()
    if isinstance(kernel, str):
        raise RuntimeError(f"the native attention kernel is {kernel}")
    n, rows, cols = logits.shape
    for name, t in (("logits", logits), ("exps", exps), ("weights", weights), ("column_sums", column_sums)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"attention_rows needs contiguous float32 CPU tensors; {name} is not")
    if not (logits.is_contiguous() and exps.is_contiguous() and exps.shape == logits.shape):
        raise ValueError("attention_rows: logits and exps must be contiguous and of one shape")
    if weights.shape != (n, rows) or column_sums.shape[0] != n or column_sums.shape[-1] < cols:
        raise ValueError(f"attention_rows: weights must be [{n}, {rows}] and column_sums [{n}, >= {cols}]")
    totals = torch.empty(n, rows)
    ylogu = torch.empty(n, rows)

    blocked = torch.finfo(torch.float32).min / 2  # masked entries hold the float32 minimum (chunked.LOWEST)
    kernel(logits.data_ptr(), exps.data_ptr(), n, rows, cols, weights.data_ptr(), weights.stride(0), log_floor,
           blocked, totals.data_ptr(), ylogu.data_ptr(), column_sums.data_ptr(), column_sums.stride(0),
           diagonal_start, torch.get_num_threads())
    return totals, ylogu
