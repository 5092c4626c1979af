"""``python -m studies NAME [--out DIR] [--quick]``: run one study (see `studies`), from a checkout."""

from __future__ import annotations

import argparse
from pathlib import Path

from studies import STUDIES, run_study


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m studies", description="Run one study: it regenerates a section of docs/results.md (rerun to resume).")
    parser.add_argument("name", choices=sorted(STUDIES), help="the study")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: docs/results/NAME; rerun to resume)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (smoke test), not the documented numbers")
    args = parser.parse_args(argv)
    report = run_study(args.name, args.out or Path("docs/results") / args.name, quick=args.quick)
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    main()
