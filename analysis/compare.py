"""Put several sweeps' best trials side by side: the same table, figures and report page.

    python -m analysis.compare RESULTS/SWEEP_A RESULTS/SWEEP_B ... [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from analysis.figures import N_LATENT, add_figure_options, render
from analysis.tables import AnalysisError, combine, load_sweep


def default_out(sweep_dirs: list[Path]) -> Path:
    """RESULTS/comparisons/A+B+... beside the first sweep."""
    names = "+".join(Path(d).resolve().name for d in sweep_dirs)
    return Path(sweep_dirs[0]).resolve().parent / "comparisons" / names[:150]


def build_comparison(sweep_dirs: list[Path], out: Path | None = None, *, all_trials: bool = False,
                     n_latent: int = N_LATENT, statmorph: bool = False) -> Path:
    """Report page comparing each sweep's best trial (lowest held-out negative ELBO), or all trials."""
    if len(sweep_dirs) < 1:
        raise AnalysisError("give at least one sweep folder RESULTS/SWEEP")
    datas = [load_sweep(d) for d in sweep_dirs]
    seen: dict[str, int] = {}
    for data in datas:
        seen[data.title] = seen.get(data.title, 0) + 1
        if seen[data.title] > 1:
            data.title = f"{data.title}#{seen[data.title]}"
    merged = combine(datas, best_only=not all_trials)
    out = Path(out) if out is not None else default_out(sweep_dirs)
    source = ", ".join(str(Path(d).resolve()) for d in sweep_dirs)
    return render(merged, out, source, n_latent=n_latent, statmorph=statmorph, by_sweep=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="sweep folders RESULTS/SWEEP")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/comparisons/A+B)")
    parser.add_argument("--all", action="store_true", help="every trial of every sweep, not only the best ones")
    add_figure_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        page = build_comparison(args.sweeps, args.out, all_trials=args.all, n_latent=args.latent_n,
                                statmorph=args.statmorph)
    except AnalysisError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
