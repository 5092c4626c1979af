"""The native row kernel (`eah_interp.native`) against an explicit float64 softmax, and its build.

`tests/test_chunked.py` runs the whole chunked attention with and without the kernel; here the kernel's
own contract is checked row by row (masked entries, rows that see nothing, the skipped diagonal at
every position, strided row weights, thread splits), and the ways it can fail to be there: no
compiler (a warning, then the PyTorch path with the same results), ``EAH_INTERP_NATIVE=0``, and a
build that must not switch the process to flush-to-zero (what ``-ffast-math`` does to a shared library).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from eah_interp import TokenLayout, native
from eah_interp.chunked import LOG_FLOOR, LOWEST, attention_rows, chunked_attention

pytestmark = pytest.mark.skipif(not native.has_compiler(), reason="no C compiler on this machine")


def chunk(seed: int = 0, n: int = 5, rows: int = 7, cols: int = 23):
    """Logits spread over ~400 nats with masked entries (one row masked whole), and row weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rows, cols, generator=g) * 60
    masked = torch.rand(n, rows, cols, generator=g) < 0.3
    masked[..., 0] = False
    masked[1, 2] = True  # a row that sees nothing
    x = x.masked_fill(masked, LOWEST)
    weights = (torch.rand(n, rows + 3, generator=g) < 0.8).float()[:, 2 : 2 + rows]  # strided rows
    return x, masked, weights


def reference(x, masked, weights, k: int, diagonal_start: int):
    """float64: softmax rows, totals relative to the row max, entropy, diagonal-free column sums."""
    logits = x.double().masked_fill(masked, float("-inf"))
    shifted = logits - logits.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    totals = shifted.exp().sum(-1)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
    n, rows, cols = x.shape
    column_sums = torch.zeros(n, k, dtype=torch.float64)
    contribution = probs * weights.double()[..., None]
    for i in range(rows):
        own = diagonal_start + i
        if 0 <= own < cols:
            contribution[:, i, own] = 0
    column_sums[:, :cols] = contribution.sum(1)
    return probs, totals, entropy, column_sums


@pytest.mark.parametrize("masking", ["scattered", "causal"])
@pytest.mark.parametrize("diagonal_start", [-3, 0, 9, 16, 40])
@pytest.mark.parametrize("implementation", ["native", "pytorch"])
def test_rows_equal_an_explicit_softmax(implementation, diagonal_start, masking):
    assert native.available(), native.status()
    x, masked, weights = chunk()
    masked_from = 0
    if masking == "causal":  # row i sees keys up to diagonal_start + i, as in a causal chunk
        keys = torch.arange(x.shape[-1])
        masked = (keys[None, :] > diagonal_start + torch.arange(x.shape[1])[:, None]).expand_as(x)
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).mul(60).masked_fill(masked, LOWEST)
        masked_from = max(diagonal_start, 0)  # no masked entry left of it
    k = x.shape[-1] + 4  # column sums wider than the chunk: only the first cols are touched
    probs, totals, entropy, want_sums = reference(x, masked, weights, k, diagonal_start)
    exps = torch.full_like(x, float("nan"))
    column_sums = torch.zeros(x.shape[0], k)
    run = native.attention_rows if implementation == "native" else attention_rows
    got_totals, ylogu = run(x.clone(), exps, weights, column_sums, diagonal_start, LOG_FLOOR, masked_from)
    safe = got_totals.double().clamp_min(1e-30)
    assert (exps[masked] == 0).all() and exps.isfinite().all()
    assert torch.allclose(exps.double() / safe[..., None], probs, atol=1e-6)
    assert torch.allclose(got_totals.double(), totals, rtol=1e-5)
    got_entropy = torch.where(got_totals > 0, safe.log() - ylogu.double() / safe, 0.0)
    assert torch.allclose(got_entropy, entropy, atol=1e-5)
    assert torch.allclose(column_sums.double(), want_sums, atol=1e-5)
    assert (column_sums[:, x.shape[-1] :] == 0).all()


def test_native_rows_are_the_same_split_over_threads():
    assert native.available(), native.status()
    x, _, weights = chunk(1, n=9, rows=16, cols=300)
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            exps, column_sums = torch.empty_like(x), torch.zeros(9, 300)
            totals, ylogu = native.attention_rows(x, exps, weights, column_sums, 100, LOG_FLOOR)
            results.append((exps, column_sums, totals, ylogu))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:  # each matrix is computed the same way whichever thread has it
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.skipif(not (hasattr(os, "fork") and os.path.exists("/proc/self/maps")), reason="Linux only")
def test_the_kernel_shares_pytorchs_openmp_runtime_and_its_fork_rule():
    # one OpenMP runtime in the process (PyTorch's); after a fork the kernel follows PyTorch's own rule
    # (GNU OpenMP is not fork-safe: a child whose parent ran parallel regions must use one thread, as
    # PyTorch's DataLoader workers do; PyTorch's own bmm hangs there otherwise)
    code = """
import os, torch
from eah_interp import native
from eah_interp.chunked import LOG_FLOOR
assert native.available(), native.status()
torch.set_num_threads(2)
x = torch.randn(4, 8, 5000)
def run():
    native.attention_rows(x, torch.empty_like(x), torch.ones(4, 8), torch.zeros(4, 5000), 0, LOG_FLOOR)
    torch.bmm(x, x.transpose(1, 2))
run()
runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line or "libiomp" in line}
assert len(runtimes) <= 1, runtimes
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    run()
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_native_rows_refuse_tensors_they_cannot_read():
    assert native.available(), native.status()
    x, _, weights = chunk()
    with pytest.raises(ValueError, match="contiguous float32"):
        native.attention_rows(x.transpose(1, 2), torch.empty_like(x), weights, torch.zeros(5, 30), 0, LOG_FLOOR)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.attention_rows(x.double(), torch.empty_like(x), weights, torch.zeros(5, 30), 0, LOG_FLOOR)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.attention_rows(x, torch.empty_like(x), weights.double(), torch.zeros(5, 30), 0, LOG_FLOOR)
    with pytest.raises(ValueError, match=r"column_sums \[5, >= 23\]"):
        native.attention_rows(x, torch.empty_like(x), weights, torch.zeros(5, 20), 0, LOG_FLOOR)


def test_loading_the_kernel_keeps_subnormal_floats():
    # a shared library linked with -ffast-math (GCC < 13) turns on flush-to-zero for the whole process
    # when it is loaded; this build must not
    code = (
        "import torch; from eah_interp import native; assert native.available(), native.status(); "
        "print((torch.tensor([1e-39]) * 3).item())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(done.stdout) == pytest.approx(3e-39, rel=1e-3, abs=0)  # not 0


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A process state as before the first build, with an empty cache; restored afterwards."""
    monkeypatch.setenv("EAH_INTERP_CACHE", str(tmp_path))
    native._kernel.cache_clear()
    yield tmp_path
    native._kernel.cache_clear()


def test_without_a_compiler_it_warns_once_and_pytorch_gives_the_same_attention(fresh_kernel, monkeypatch):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 40, 8, generator=g) for _ in range(3))
    layout = TokenLayout.from_spans([(2, 30)], 40)
    want_out, want_sums = chunked_attention(q, k, v, None, 0.35, layout)  # kernel built in the fresh cache
    assert list(fresh_kernel.glob("native/attention_rows-*.so"))
    native._kernel.cache_clear()
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-compiler"))
    monkeypatch.setenv("EAH_INTERP_CACHE", str(fresh_kernel / "elsewhere"))
    with pytest.warns(RuntimeWarning, match="native attention kernel is unavailable"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: not again
        assert "unavailable" in native.status()
    out, sums = chunked_attention(q, k, v, None, 0.35, layout)
    assert torch.allclose(out, want_out, atol=1e-6)
    assert torch.allclose(sums.column_sums, want_sums.column_sums, atol=1e-6)
    assert torch.allclose(sums.entropy, want_sums.entropy, atol=1e-5)


def test_it_can_be_turned_off_and_builds_once(fresh_kernel, monkeypatch):
    monkeypatch.setenv("EAH_INTERP_NATIVE", "0")
    assert not native.available() and "turned off" in native.status()
    native._kernel.cache_clear()
    monkeypatch.delenv("EAH_INTERP_NATIVE")
    first = native.build()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert native.available() and str(first) in native.status()
