"""``eah-interp`` as a torchrun worker script, with an optional fault: the test suite's way to SIGKILL one rank.

``EAH_TEST_FAULT="<rank>:<where>:<k>"`` makes that rank kill itself with SIGKILL (no cleanup, no
exception handler runs), at its ``k``-th call of:

* ``layer``: `HeadStats.update_from_stats` (one call per layer of a forward: ``k`` not a multiple of the
  layer count is the middle of a batch);
* ``replace``: ``os.replace`` in `eah_interp.resumable.atomic_write`, i.e. after a checkpoint's temporary
  file is written and before it replaces the checkpoint;
* ``generate``: `eah_interp.experiments.generate_texts` as the evaluation runner calls it (one batch of
  captions), i.e. in the middle of an ``eval`` run.

Usage: ``torchrun --nproc_per_node 2 tests/distributed_worker.py scan --model tiny-llava ...``.
"""

from __future__ import annotations

import os
import signal


def _install_fault(spec: str) -> None:
    rank, where, k = spec.split(":")
    if int(rank) != int(os.environ.get("RANK", "0")):
        return
    calls = [0]

    def hit() -> None:
        calls[0] += 1
        if calls[0] == int(k):
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "layer":
        from eah_interp.head_stats import HeadStats

        original = HeadStats.update_from_stats

        def update(self, layer, stats):
            hit()
            original(self, layer, stats)

        HeadStats.update_from_stats = update  # type: ignore[method-assign]
    elif where == "replace":
        import eah_interp.resumable as resumable

        real_replace = os.replace

        class _Os:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                hit()
                real_replace(src, dst)

        resumable.os = _Os()  # type: ignore[assignment]
    elif where == "generate":
        import eah_interp.evaluation.runner as evaluation

        original_generate = evaluation.generate_texts

        def generate(*args, **kwargs):
            hit()
            return original_generate(*args, **kwargs)

        evaluation.generate_texts = generate  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown fault site {where!r}")


if __name__ == "__main__":
    if os.environ.get("EAH_TEST_FAULT"):
        _install_fault(os.environ["EAH_TEST_FAULT"])
    from eah_interp.cli import app

    app(prog_name="eah-interp")
