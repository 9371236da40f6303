"""Label-transfer benchmark: which predictor, which Unknown threshold, and what kNN labels cost.

Quality (bench.quality's atlases and hidden labels: 80% of the labels seen, 20% hidden and scored), per
preset × seed, one bigatlas run with labels, and each predictor on the hidden cells: accuracy, macro-F1,
ECE and rare-class recall of the uncalibrated head (what embed wrote before), the calibrated head, the
kNN vote and both: labels hidden inside the training set (scANVI's setting; the hidden cells are
unlabelled training cells, in the reference index). Novel types and queries: the same atlas trained
without one coarse type and without the hidden known cells, so both are cells the model never saw, as a
new data set's are; AUROC of the uncertainty for the novel type's cells against the known ones, the
share of each called Unknown at several thresholds, and each predictor on the known cells (rows with
`known_cells: query`; before 2026-12-05 the known cells of this run were training cells).

Speed: the reference index of 200,000 cells of a 1,000,000-cell store (build seconds, UMAP included),
then that store embedded to disk twice in one run: without a reference (the head alone: embed before
this index existed) and with kNN labels; K1 = kNN cells/s ÷ head-only cells/s. Also the kNN search
alone (cells/s) and its recall against the exact search.

    python -m bench.transfer                 # everything; bench/results/transfer.json
    python -m bench.transfer --skip-speed    # quality only
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import ensure_store, main, write_results
from bench.quality import BATCH_KEY, LABELS, TRUTH, atlas, overrides
from bench.transfer_novel import THRESHOLDS, novel_row


def add_arguments(p) -> None:
    p.add_argument("--presets", nargs="+", default=["rare", "subtle", "condition"], help="synth presets")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="atlas and training seeds")
    p.add_argument("--cells", type=int, default=8000, help="cells per atlas")
    p.add_argument("--genes", type=int, default=1000, help="genes per atlas")
    p.add_argument("--epochs", type=int, default=60, help="training epochs")
    p.add_argument("--hidden-fraction", type=float, default=0.2, help="labelled cells whose label is hidden")
    p.add_argument("--model", nargs="*", default=[], help="ModelConfig overrides, key=value (quality runs)")
    p.add_argument("--train", nargs="*", default=[], help="TrainConfig overrides, key=value (quality runs)")
    p.add_argument("--skip-quality", action="store_true", help="speed only")
    p.add_argument("--skip-speed", action="store_true", help="quality only")
    p.add_argument("--query-cells", type=int, default=1_000_000, help="cells embedded for K1")
    p.add_argument("--reference-cells", type=int, default=200_000, help="cells in the speed run's reference")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--data-dir", default="bench/data", help="where atlases and stores are built or reused")
    p.add_argument("--out", default="bench/results/transfer.json", help="JSON result file")
    p.add_argument("--table", action="store_true", help="print the result file's tables (markdown) and exit")
    p.add_argument(
        "--tag", default=None, help="label the quality rows (a setting beside the defaults); with --table, print the "
        "means of the rows of this tag instead of the file's summary",
    )  # fmt: skip


def _fit(adata, a, seed, run_dir):
    from bigatlas.api import AtlasVAE

    train = {**overrides(a.train), "seed": seed, "checkpoint_every_steps": 0}
    model = AtlasVAE(adata, batch_key=BATCH_KEY, label_keys=[LABELS], model=overrides(a.model), train=train)
    return model.fit(run_dir, max_epochs=a.epochs)


def _predictors(model, z):
    """{name: probabilities} for every predictor, the in-distribution factor per cell, the default's name and the
    reference's validation scores of each predictor (accuracy, ECE, NLL)."""
    import torch

    from bigatlas.reference import read_reference
    from bigatlas.transfer import LabelTransfer

    reference = read_reference(model.run_dir)
    transfer = LabelTransfer(model.module, model.vocab, reference)
    zt = torch.from_numpy(z)
    with torch.no_grad():
        raw = torch.softmax(model.module.label_logits(zt)[0].float(), 1).numpy()
    head = transfer.head_probs(zt)[LABELS]
    _, idx, w = transfer.neighbours(zt)
    knn = transfer.knn_probs(idx, w)[LABELS]
    results, _ = transfer(zt)
    probs = {"head_uncalibrated": raw}
    probs.update({name: transfer.combine(LABELS, head, knn, name) for name in ("head", "knn", "both")})
    validation = reference.info.get("validation", {}).get(LABELS)
    return probs, results[LABELS].in_dist, transfer.predictors[LABELS], validation


def predictor_scores(probs, truth, classes) -> dict:
    """Accuracy, macro-F1, ECE, NLL (of the true class) and AURC (the winner's probability ranking the errors) of
    one predictor on the scored cells, and recall of the types under 1% of them."""
    from bigatlas.calibration import ece, nll
    from bigatlas.metrics import confusion, prediction_scores
    from bigatlas.transfer_report import risk_coverage_area

    pred = np.asarray(classes)[probs.argmax(1)]
    s = prediction_scores(confusion(pd.Categorical(truth), pd.Categorical(pred)))
    y = pd.Categorical(truth, categories=classes).codes
    ok = y >= 0
    p, yy = probs[ok], y[ok]
    row = {"accuracy": round(s["accuracy"], 4), "macro_f1": round(s["macro_f1"], 4), "ece": round(ece(p, yy), 4),
           "nll": round(nll(p, yy), 4),
           "aurc": round(risk_coverage_area(-p.max(1), p.argmax(1) == yy), 4)}  # fmt: skip
    counts = pd.Series(truth).value_counts()
    is_rare = np.isin(truth, counts.index[counts < 0.01 * len(truth)])
    if is_rare.any():
        row["rare_recall"] = round(float((pred[is_rare] == truth[is_rare]).mean()), 4)
    return row


def quality(a) -> list[dict]:
    rows = []
    for preset in a.presets:
        for seed in a.seeds:
            adata = atlas(a, preset, seed)
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                model = _fit(adata, a, seed, Path(tmp) / "run")
                z = model.get_latent_representation()
                probs, _, default, validation = _predictors(model, z)
                hidden = adata.obs["bench_hidden"].to_numpy()
                truth = adata.obs[TRUTH].astype(str).to_numpy()[hidden]
                classes = model.vocab.label_classes[LABELS]
                row = {"preset": preset, "seed": seed, "default": default, "seconds": round(time.perf_counter() - t, 1)}
                if a.tag:
                    row["tag"] = a.tag
                row.update({name: predictor_scores(p[hidden], truth, classes) for name, p in probs.items()})
                row["default_scores"] = row[default]
                row["validation"] = validation
            row["novel"] = novel_row(adata, a, seed, _fit, _predictors, predictor_scores)
            print(row, flush=True)
            rows.append(row)
    return rows


def _mean_scores(rows: list[dict], names) -> dict:
    """Per predictor name, the mean of each score over the rows that have it."""
    return {name: _means([r[name] for r in rows]) for name in names}


def _means(dicts: list[dict]) -> dict:
    """Per key, the mean of the values the dicts have (None: none)."""
    keys = dict.fromkeys(k for d in dicts for k in d)
    return {k: round(float(np.mean(v)), 4) if (v := [d[k] for d in dicts if d.get(k) is not None]) else None
            for k in keys}  # fmt: skip


def summary(rows: list[dict]) -> dict:
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        entry = _mean_scores(mine, ("head_uncalibrated", "head", "knn", "both", "default_scores"))
        novel = [r["novel"] for r in mine if r.get("novel")]
        query = [n["query"] for n in novel if "query" in n]
        if query:  # the hidden known cells as queries (out of training), where the rows have them
            entry["query"] = _mean_scores(query, tuple(query[0]))
        if novel:
            entry["novel_auroc"] = round(float(np.mean([n["auroc"] for n in novel])), 4)
            for key in ("unknown_novel", "unknown_known", "accuracy_known_not_unknown"):
                entry[key] = {str(t): round(float(np.mean([n[key][str(t)] for n in novel])), 4) for t in THRESHOLDS}
        by = [n for n in novel if "by_predictor" in n]
        if by:  # each predictor's own uncertainty, and its validation NLL (what --predictor auto picks by)
            entry["by_predictor"] = {
                name: _means([n["by_predictor"][name] for n in by]) for name in by[0]["by_predictor"]
            }
            for name, e in entry["by_predictor"].items():
                nll = [n["validation"][name]["nll"] for n in by if "nll" in (n.get("validation") or {}).get(name, {})]
                if nll:
                    e["validation_nll"] = round(float(np.mean(nll)), 4)
        out[preset] = entry
    return out


def speed(a) -> dict:
    import torch

    from bench.infer import _run_dir
    from bigatlas.infer import embed
    from bigatlas.knn import LatentIndex
    from bigatlas.reference import read_reference
    from bigatlas.reference_build import build_reference

    data = ensure_store(a.data_dir, a.query_cells, 2000)
    run = _run_dir(ensure_store(a.data_dir, 100_000, 2000), a.data_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    try:
        head_run = work / "head_run"  # the same model without a reference: embed as it was
        shutil.copytree(run, head_run, ignore=shutil.ignore_patterns("reference", "checkpoints"))
        knn_run = work / "knn_run"
        shutil.copytree(head_run, knn_run)
        t = time.perf_counter()
        build_reference(knn_run, data, max_cells=a.reference_cells)
        build_s = time.perf_counter() - t
        ref = read_reference(knn_run)
        out = {
            "query_cells": a.query_cells,
            "reference_cells": ref.n_cells,
            "reference_build_seconds": round(build_s, 1),
        }
        out["reference_umap_seconds"] = ref.info.get("seconds_umap")
        for name, r in (("head_only", head_run), ("knn", knn_run)):
            t = time.perf_counter()
            embed(r, data, work / f"{name}.zarr", progress=False)
            out[f"embed_{name}_cells_per_s"] = round(a.query_cells / (time.perf_counter() - t))
        out["K1_knn_over_head_only"] = round(out["embed_knn_cells_per_s"] / out["embed_head_only_cells_per_s"], 3)
        import zarr

        z = torch.from_numpy(zarr.open_group(str(work / "knn.zarr"))["obsm/X_bigatlas"][: min(a.query_cells, 200_000)])
        a_ = ref.arrays
        index = LatentIndex(a_["latent"], a_.get("cluster"), a_.get("centroids"))
        t = time.perf_counter()
        for lo in range(0, len(z), 16384):
            index.search(z[lo : lo + 16384], 15)
        out["knn_search_cells_per_s"] = round(len(z) / (time.perf_counter() - t))
        exact = LatentIndex(a_["latent"], exact=True)
        q = z[:: max(1, len(z) // 2000)][:2000]
        _, want = exact.search(q, 15)
        _, got = index.search(q, 15)
        out["knn_recall_vs_exact"] = round(
            float(np.mean([len(set(x.tolist()) & set(y.tolist())) / 15 for x, y in zip(got, want)])), 4
        )
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


NAMES = {"head_uncalibrated": "head, uncalibrated (before)", "head": "head, calibrated", "knn": "kNN vote",
         "both": "both (mean)", "default_scores": "**default** (chosen per run)"}  # fmt: skip


def _predictor_lines(preset: str, scores: dict) -> list[str]:
    lines = []
    for name, label in NAMES.items():
        if name in scores:
            m = scores[name]
            more = " | ".join(
                f"{m[k]:.{4 if k == 'aurc' else 3}f}" if k in m else "–" for k in ("nll", "aurc", "rare_recall")
            )
            lines.append(
                f"| {preset} | {label} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['ece']:.3f} | {more} |"
            )
    return lines


def table(result: dict, tag: str | None = None) -> str:
    """The file's summary as markdown; with a tag, the means of that tag's rows (every seed the file has)."""
    if tag is not None:
        rows = [r for r in result.get("rows", []) if r.get("tag") == tag]
        if not rows:
            tags = sorted({str(r.get("tag")) for r in result.get("rows", [])})
            raise SystemExit(f"no rows tagged {tag!r} (the file's tags: {', '.join(tags) or 'none'})")
        result = {"summary": summary(rows)}
    header = "| atlas | {}predictor | accuracy | macro-F1 | ECE | NLL | AURC | rare recall |"
    rule = "|---|---|---|---|---|---|---|---|"
    lines = [header.format(""), rule]
    for preset, e in result["summary"].items():
        lines += _predictor_lines(preset, e)
    if any("query" in e for e in result["summary"].values()):
        lines += ["", header.format("query cells, out of training: "), rule]
        for preset, e in result["summary"].items():
            lines += _predictor_lines(preset, e.get("query", {}))
    lines += [
        "",
        "| atlas | novel type: AUROC | Unknown at 0.4 / 0.5 / 0.6: novel cells | known cells |",
        "|---|---|---|---|",
    ]
    for preset, e in result["summary"].items():
        if "novel_auroc" in e:
            nov = " / ".join(f"{e['unknown_novel'][t]:.2f}" for t in ("0.4", "0.5", "0.6"))
            kno = " / ".join(f"{e['unknown_known'][t]:.3f}" for t in ("0.4", "0.5", "0.6"))
            lines.append(f"| {preset} | {e['novel_auroc']:.3f} | {nov} | {kno} |")
    if any("by_predictor" in e for e in result["summary"].values()):
        lines += ["", "| atlas | predictor (its own uncertainty) | novel type: AUROC | novel cells Unknown at 0.5 "
                  "| known cells Unknown | known cells kept: accuracy | known cells: AURC | validation NLL |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for preset, e in result["summary"].items():
            for name, m in e.get("by_predictor", {}).items():
                cells = [
                    m.get(k) for k in ("auroc", "unknown_novel_0.5", "unknown_known_0.5", "accuracy_known_kept_0.5")
                ]
                cells = [f"{v:.3f}" if v is not None else "–" for v in cells]
                aurc, nll = m.get("aurc_known"), m.get("validation_nll")
                cells += [f"{aurc:.4f}" if aurc is not None else "–", f"{nll:.3f}" if nll is not None else "–"]
                lines.append(f"| {preset} | {NAMES.get(name, name)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def run(a) -> dict:
    import json

    import torch

    if a.table:
        print(table(json.loads(Path(a.out).read_text()), a.tag))
        return {}

    torch.set_num_threads(a.threads)
    result = {"setup": {k: getattr(a, k) for k in ("cells", "genes", "epochs", "hidden_fraction", "threads")}}
    if not a.skip_quality:
        rows = quality(a)
        result.update({"rows": rows, "summary": summary(rows)})
    if not a.skip_speed:
        result["speed"] = speed(a)
        print(result["speed"], flush=True)
    out = Path(a.out)
    if out.exists():  # keep the part not rerun
        old = json.loads(out.read_text())
        result = {**old, **result}
    return write_results(result, out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
