#!/usr/bin/env python3
"""Check a local MIMIC-CXR-JPG folder for the paper preset and write its cohort table.

    python scripts/prepare_mimic.py /data/mimic-cxr-jpg/2.1.0            # writes runs/mimic-cohort/
    python scripts/prepare_mimic.py /data/mimic-cxr-jpg/2.1.0 --out /tmp/cohort --allow-missing

It reads the three metadata CSVs (plain or .gz), keeps the PA views with a cardiomegaly label under
the preset's label policy, checks that every kept image is on disk, and partitions the patients as
the run will (same preset, same seed). Written, atomically, to ``--out``:

- ``cohort.csv``: one row per kept image (subject, study, relative path, label, official split);
  this stays on the machine that holds the data: it contains MIMIC identifiers.
- ``cohort-report.json``: the counts only (what ``python -m fl_unlearn.data inspect`` prints).

Exit status: 0 when the folder is ready for ``scripts/run.py --preset paper``, 1 when image files are
missing (unless ``--allow-missing``), 2 when the folder or its CSVs are unusable (one message says why).
Nothing is written unless the CSVs are usable and the patients can be partitioned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the MIMIC-CXR-JPG folder (the one holding files/ and the metadata CSVs)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "mimic-cohort"), help="folder for cohort.csv and the report")
    parser.add_argument("--preset", default="paper", help="preset whose data settings apply (default: paper)")
    parser.add_argument("--run-config", action="append", default=[], help="extra 'key=value ...' data overrides")
    parser.add_argument("--allow-missing", action="store_true", help="write the table even if image files are missing")
    args = parser.parse_args(argv)

    from flwr.common.config import parse_config_args

    from fl_unlearn.config import PRESET_DIR, load_preset
    from fl_unlearn.data.inspect import cohort_report, format_report
    from fl_unlearn.data.sources import load_cohort
    from fl_unlearn.errors import FlUnlearnError
    from fl_unlearn.io import write_json_atomic, write_text_atomic

    preset = args.preset if Path(args.preset).suffix else str(PRESET_DIR / f"{args.preset}.toml")
    overrides = parse_config_args(args.run_config) if args.run_config else {}
    try:
        config = load_preset(preset, {**overrides, "data-source": "mimic", "data-root": args.root})
        cohort = load_cohort(config)
        report = cohort_report(config, cohort)
    except FlUnlearnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    out = Path(args.out).expanduser().resolve()
    missing = report["missing_image_files"]
    if missing and not args.allow_missing:
        print(f"error: {missing} of {report['images']} kept images are not under {cohort.root} "
              f"(e.g. {report['missing_examples'][0]}); download them or pass --allow-missing. "
              f"Nothing was written.", file=sys.stderr)
        return 1
    if "partition_error" in report:
        print(f"error: the preset cannot partition this cohort: {report['partition_error']}. Nothing was written.",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "cohort.csv", cohort.table.to_csv(index=False))
    write_json_atomic(out / "cohort-report.json", report)
    print(f"wrote {out / 'cohort.csv'} ({len(cohort.table)} images) and {out / 'cohort-report.json'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
