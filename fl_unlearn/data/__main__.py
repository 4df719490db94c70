"""Command line: ``python -m fl_unlearn.data inspect|preview --source phantom|mimic|nih|chexpert [--root PATH]``."""

from __future__ import annotations

import argparse
import json
import sys

from fl_unlearn.config import load_preset
from fl_unlearn.errors import FlUnlearnError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_unlearn.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("inspect", "print counts before training (works on metadata alone)"),
                            ("preview", "write a PNG grid of patients x visits")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--source", default="phantom", help="phantom, mimic, nih or chexpert")
        p.add_argument("--root", default="", help="local dataset folder (real sources)")
        p.add_argument("--preset", default=None, help="run preset whose data settings to use (default: cpu)")
        p.add_argument("--num-hospitals", type=int, default=None)
        p.add_argument("--image-size", type=int, default=None)
        p.add_argument("--label-policy", default=None, help="drop, u-zeros or u-ones (MIMIC, CheXpert)")
        p.add_argument("--cache-dir", default=None, help="where the phantom cohort is cached (default ~/.cache/fl-unlearn)")
        if name == "inspect":
            p.add_argument("--json", action="store_true", help="print the report as JSON")
        else:
            p.add_argument("--out", required=True, help="PNG file to write")
            p.add_argument("--patients", type=int, default=6)
            p.add_argument("--visits", type=int, default=6)
            p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling for viewing")
    args = parser.parse_args(argv)

    overrides = {"data-source": args.source, "data-root": args.root}
    for key in ("num_hospitals", "image_size", "label_policy", "cache_dir"):
        if getattr(args, key) is not None:
            overrides[key.replace("_", "-")] = getattr(args, key)
    try:
        from fl_unlearn.data.inspect import cohort_report, format_report, preview_grid, save_png
        from fl_unlearn.data.sources import load_cohort

        config = load_preset(args.preset, overrides)
        if args.command == "inspect":
            report = cohort_report(config)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        else:
            grid = preview_grid(load_cohort(config), patients=args.patients, visits=args.visits)
            print(save_png(grid, args.out, scale=args.scale))
    except FlUnlearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
