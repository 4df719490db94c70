"""Central evaluation: utility AUC and FID of every synthetic set, the report and its pictures.

The server holds the patient-disjoint real test set (as in the paper). The real-data reference
classifier is trained with FedAvg on the hospitals' training images, so no real training image is
ever pooled; it is both the utility yardstick and, without Inception weights, the feature extractor
of "FID (domain features)".
"""

from __future__ import annotations

import json

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from fl_unlearn.checkpoint import load_checkpoint
from fl_unlearn.data.inspect import save_png
from fl_unlearn.data.sources import load_federation
from fl_unlearn.evaluation import fid
from fl_unlearn.evaluation.catalog import build_catalog
from fl_unlearn.evaluation.metrics import auc_with_ci
from fl_unlearn.evaluation.report import (
    COLUMNS,
    LABELS,
    before_after_grid,
    cell,
    markdown_table,
    privacy_utility_plot,
)
from fl_unlearn.evaluation.utility import utility_auc
from fl_unlearn.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from fl_unlearn.models.classifier import build_classifier
from fl_unlearn.runs import RunDirectory, library_versions
from fl_unlearn.training.classifier import ClassifierTrainConfig, features, predict
from fl_unlearn.training.common import derived_seed
from server.federation import Federation
from server.generative import load_synthetic_set
from server.privacy import control_summary
from server.rounds import fedavg_rounds
from server.unlearning import table_rows

console = Console(width=160, force_terminal=False)


def train_classifier(federation: Federation, run: RunDirectory) -> dict:
    """FedAvg rounds of the reference cardiomegaly classifier on the hospitals' real training images."""
    cfg = run.config
    torch.manual_seed(cfg.seed + 3)
    initial = {k: v.detach().clone() for k, v in build_classifier(cfg.classifier_backbone).state_dict().items()}
    fedavg_rounds(federation, run, phase="train-classifier", rounds=cfg.classifier_rounds, initial=initial,
                  checkpoint=run.file("checkpoints", "classifier.safetensors"), config={},
                  meta={"backbone": cfg.classifier_backbone})
    return {"rounds": cfg.classifier_rounds}


def evaluate(federation: Federation, run: RunDirectory) -> dict:
    """AUC and FID per synthetic set; results.json/csv, report.md, the plot and the before/after grid."""
    cfg = run.config
    cohort, plan = load_federation(cfg)
    test = plan.test_rows(cohort.table)
    test_images, test_labels = cohort.load_images(test), test["label"].to_numpy()
    reference = build_classifier(cfg.classifier_backbone)
    reference.load_state_dict(load_checkpoint(run.file("checkpoints", "classifier.safetensors"))[0])
    reference.to(cfg.torch_device)
    # Domain features serve the catalog's embeddings always, and FID when no Inception weights are given.
    inception = (fid.inception_extractor(cfg.fid_inception_weights, device=cfg.torch_device)
                 if cfg.fid_inception_weights else None)
    fid_name = fid.STANDARD if inception else fid.DOMAIN
    test_features = inception(test_images) if inception else features(reference, test_images)

    def utility(name: str) -> tuple:
        images, index = load_synthetic_set(run, name)
        result = utility_auc(images, index["label"].to_numpy(), test_images, test_labels,
                             backbone=cfg.classifier_backbone, device=cfg.torch_device,
                             config=ClassifierTrainConfig(steps=cfg.classifier_steps, bf16=cfg.bf16,
                                                          seed=derived_seed(cfg.seed, "utility", name)))
        return images, {"auc": result["auc"], "auc_ci_low": result["ci_low"], "auc_ci_high": result["ci_high"]}

    rows = table_rows(run)
    sets, domain = {}, {}
    for row in rows:
        images, auc = utility(row["method"])
        sets[row["method"]] = images
        domain[row["method"]] = features(reference, images)
        row.update(**auc, fid=fid.frechet_distance(inception(images) if inception else domain[row["method"]],
                                                   test_features), fid_images=len(images))
        print(f"[fl-unlearn] evaluate {row['method']}: AUC {row['auc']:.3f}, {fid_name} {row['fid']:.1f}", flush=True)
    # The closed loop: privacy and utility after every cycle (the last cycle's set is the method's row).
    cycles: dict[str, list[dict]] = {}
    for row in rows:
        for entry in run.manifest["phases"].get(f"unlearn-{row['method']}", {}).get("cycles", []):
            last = entry["set"] == row["method"]
            auc = {k: row[k] for k in ("auc", "auc_ci_low", "auc_ci_high")} if last else utility(entry["set"])[1]
            cycles.setdefault(row["method"], []).append({**entry, **auc})
    real = auc_with_ci(test_labels, predict(reference, test_images), seed=cfg.seed)
    rows.append({"method": "real", "auc": real["auc"], "auc_ci_low": real["ci_low"], "auc_ci_high": real["ci_high"]})

    audits = {r["method"]: json.loads(run.file("audit", f"{r['method']}.json").read_text())
              for r in rows if r["method"] != "real"}
    per_hospital = {method: {site: {k: h[k] for k in ("non_anon", "oda", "pir", "patients_linked", "control-rate",
                                                      "threshold")}
                             for site, h in audit["hospitals"].items()} for method, audit in audits.items()}
    entanglement = {site: {k: h[k] for k in ("entanglement-es", "entanglement-percent") if k in h}
                    for site, h in audits["original"]["hospitals"].items()}
    results = {"images": audits["original"]["images"], "test": {"images": len(test), "positives": int(test_labels.sum())},
               "fid": {"name": fid_name, "images": audits["original"]["images"], "reference": "real test set"},
               "threshold": audits["original"]["threshold"], "calibrated": audits["original"]["calibrated"],
               "control": control_summary(audits["original"]["hospitals"]),
               "rows": rows, "cycles": cycles, "missed": run.manifest.get("missed", []), "hospitals": per_hospital, "entanglement": entanglement, "versions": library_versions()}
    results["catalog"] = _catalog(run, rows, sets, domain)
    report_dir = run.file("report")
    write_json_atomic(report_dir / "results.json", results)
    write_text_atomic(report_dir / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    write_bytes_atomic(report_dir / "privacy_utility.png", privacy_utility_plot(rows, fid_name))
    after = {m: s for m, s in sets.items() if m != "original"}
    save_png(before_after_grid(sets["original"], after), report_dir / "before_after.png", scale=2)
    write_text_atomic(run.file("report.md"), _report_markdown(run, results, fid_name, list(sets)))
    _print(rows, fid_name, results["images"])
    print(f"[fl-unlearn] report: {run.file('report.md')}", flush=True)
    return {"report": str(run.file("report.md")), "fid": fid_name}


#: Utility an unlearned set may lose against the original and still be chosen for the catalog by "auto".
CATALOG_AUC_TOLERANCE = 0.05


def _catalog(run: RunDirectory, rows: list[dict], sets: dict, embeddings: dict) -> dict:
    """Build the catalog from the configured set (auto: fewest non-anonymous images among the sets whose
    utility AUC is within CATALOG_AUC_TOLERANCE of the original's), without the images still flagged."""
    cfg = run.config
    method = cfg.catalog_method
    if method == "auto":
        by_method = {r["method"]: r for r in rows if r["method"] in sets}
        floor = by_method["original"]["auc"] - CATALOG_AUC_TOLERANCE
        useful = [m for m, r in by_method.items() if r["auc"] >= floor]
        method = min(useful, key=lambda m: (by_method[m]["non_anon"], m != "original"))
    audit = pd.read_csv(run.file("audit", f"{method}.csv"))
    scores = audit[[c for c in audit.columns if c.endswith("-score")]].max(axis=1).to_numpy()
    images = sets[method]
    summary = build_catalog(run.file("catalog"), images, audit, scores, audit["non_anonymous"].to_numpy(bool),
                            embeddings[method], method=method, embedding_name="reference classifier features")
    print(f"[fl-unlearn] catalog: {summary['cases']} cases from {method!r} ({summary['removed']} flagged removed): "
          f"{run.file('catalog', 'viewer.html')}", flush=True)
    return summary


def _report_markdown(run: RunDirectory, results: dict, fid_name: str, sets: list[str]) -> str:
    cfg = run.config
    c = results["control"]
    lines = [f"# fl-unlearn report: run `{cfg.run_name}`", "",
             (f"{cfg.num_hospitals} hospitals, data `{cfg.data_source}` at {cfg.image_size}×{cfg.image_size}; "
             f"{results['images']} synthetic images (balanced by class), regenerated on the same seeds after each "
             f"method. Real test set: {results['test']['images']} images of patients no hospital trains on."), "",
             (f"- Threshold: {'calibrated per hospital' if results['calibrated'] else 'fixed'} "
             f"({', '.join(f'{s} {t:.3f}' for s, t in results['threshold'].items())})."),
             ("- control FP %: unseen patients' images passed through the autoencoder, flagged by the audit "
             "(the highest rate over hospitals). Pooled over the federation: "
             f"{c['flagged']} of {c['images']} ({100 * c['rate']:.1f}%, Wilson 95% CI "
             f"{100 * c['ci_low']:.1f}–{100 * c['ci_high']:.1f}%)."),
             f"- FID column: **{fid_name}** on {results['fid']['images']} images against the real test set"
             + ("" if fid_name == fid.STANDARD else
                " (the reference classifier's penultimate features, not Inception: not comparable with published FID)")
             + ".", ("- AUC: a classifier trained on the row's synthetic set only, tested on the real test set "
             "(bootstrap 95% CI); row *Real data*: the FedAvg reference classifier."), "",
             markdown_table(results["rows"]), "", "![privacy vs utility](report/privacy_utility.png)", "",
             "Same seeds before (top row) and after each method (rows below, in the order "
             + ", ".join(LABELS.get(s, s) for s in sets) + "):", "", "![before and after](report/before_after.png)", "",
             (f"Catalog: {results['catalog']['cases']} cases from `{results['catalog']['method']}` with the "
             f"{results['catalog']['removed']} images still flagged by a hospital removed; open "
             "[catalog/viewer.html](catalog/viewer.html) in a browser."), "",
             *_cycles_markdown(results["cycles"]), *_missed_markdown(results["missed"]),
             "## Per hospital", "", "| method | hospital | Non-Anon | ODA % | PIR % | patients linked | control FP % |",
             "|---|---|---|---|---|---|---|"]
    for method, sites in results["hospitals"].items():
        for site, h in sites.items():
            lines.append(f"| {LABELS.get(method, method)} | {site} | {h['non_anon']} | {h['oda']:.1f} | {h['pir']:.1f} "
                         f"| {h['patients_linked']} | {100 * h['control-rate']:.1f} |")
    lines += ["", "## Entanglement of D_f and D_r (retrieval embeddings, Zhao et al.)", "",
              "| hospital | ES | bounded % |", "|---|---|---|"]
    for site, e in results["entanglement"].items():
        lines.append(f"| {site} | {e['entanglement-es']:.2f} | {e['entanglement-percent']:.1f} |" if e else
                     f"| {site} | – | – |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def _missed_markdown(missed: list[dict]) -> list[str]:
    if not missed:
        return []
    lines = ["## Hospitals that missed a step", "",
             ("The phase went on with the hospitals that answered; a hospital that missed an audit is audited "
             "again at the next unlearning phase, and its forget set stays pending in the ledger until then."), "",
             "| hospital | phase | step | error |", "|---|---|---|---|"]
    lines += [f"| {m['hospital']} | {m['phase']} | {m['step']} | {m['error'].replace('|', '/')} |" for m in missed]
    return [*lines, ""]


def _cycles_markdown(cycles: dict) -> list[str]:
    if not cycles:
        return []
    lines = ["## Closed loop: audit → unlearn with the grown forget set", "",
             "UA and newly exposed are against the forget set that cycle unlearned (grown by the audit before it).",
             "", "| method | cycle | forget patients | Non-Anon | PIR % | UA % | newly exposed | AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for method, entries in cycles.items():
        lines += [f"| {LABELS.get(method, method)} | {e['cycle']} | {e['forget_patients']} | {e['non_anon']} | "
                  f"{e['pir']:.1f} | {e['ua']:.1f} | {e['newly_exposed']} | {e['auc']:.3f} |" for e in entries]
    return [*lines, ""]


def _print(rows: list[dict], fid_name: str, images: int) -> None:
    table = Table(title=f"Results on {images} synthetic images (FID column: {fid_name})")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "method" else "right")
    for row in rows:
        table.add_row(*(cell(row, key, pattern) for _, key, pattern in COLUMNS))
    console.print(table)
