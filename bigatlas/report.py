"""One-page report of an evaluation: report.md and report.html (same content, figures beside them)."""

from __future__ import annotations

import html
from pathlib import Path

from .metrics import BATCH, BIO

NAMES = {
    "ari": "ARI (k-means vs labels)",
    "nmi": "NMI (k-means vs labels)",
    "silhouette_label": "label silhouette",
    "clisi": "cLISI",
    "isolated_labels": "isolated labels",
    "knn_label_accuracy": "label kNN accuracy (k=15)",
    "silhouette_batch": "batch silhouette",
    "ilisi": "iLISI",
    "kbet": "kBET acceptance",
    "graph_connectivity": "graph connectivity",
    "batch_mixing": "batch mixing (k=15, 1 = random)",
    "bio_conservation": "**bio conservation (mean)**",
    "batch_correction": "**batch correction (mean)**",
    "total": "**total (0.6 bio + 0.4 batch)**",
}
ROWS = [*BIO, "knn_label_accuracy", *BATCH, "batch_mixing", "bio_conservation", "batch_correction", "total"]


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def markdown(result: dict, run: Path | None) -> str:
    scores = result["scores"]
    methods = list(scores)
    lines = [
        "# bigatlas evaluation",
        "",
        f"- embedding: `{result['embedding']}`",
        f"- data: `{result['data']}`" + (f" (obs_filter `{result['obs_filter']}`)" if result["obs_filter"] else ""),
        f"- run: `{run}`" if run else "- run: unknown",
        f"- cells: {result['n_evaluated']:,} evaluated (stratified by `{result['label_key']}`) "
        f"of {result['n_obs']:,}; batches = `{result['batch_key']}`",
        "",
        "## Integration (scIB metrics, higher is better)",
        "",
        "| metric | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for row in ROWS:
        lines.append(f"| {NAMES[row]} | " + " | ".join(_fmt(scores[m].get(row)) for m in methods) + " |")
    if "pca_baseline" in scores:
        lines += [
            "",
            "`pca_baseline`: PCA of log1p(counts per 10k) of the same cells, "
            "2,000 most variable genes, as many components as the latent space.",
        ]
    if result["predictions"]:
        lines += [
            "",
            "## Label predictions (all cells with a known label)",
            "",
            "| prediction vs known | cells | accuracy | macro-F1 | classes unseen in training |",
            "|---|---|---|---|---|",
        ]
        for name, s in result["predictions"].items():
            lines.append(
                f"| {name} | {s['n_cells']:,} | {_fmt(s['accuracy'])} | {_fmt(s['macro_f1'])} | "
                f"{', '.join(s['unseen_classes']) or '–'} |"
            )
        for name, s in result["predictions"].items():
            per = ", ".join(f"{b} {a:.3f}" for b, a in s["per_batch_accuracy"].items())
            lines += ["", f"Accuracy per batch, {name}: {per}"]
            if s.get("query_cells"):
                lines += [
                    "",
                    f"Query cells (outside the run's training slice), {name}: {s['query_cells']:,} cells, "
                    f"accuracy {_fmt(s['query_accuracy'])} (reference cells: {_fmt(s['reference_accuracy'])})",
                ]
    lines += _transfer_lines(result.get("label_transfer") or {})
    lines += _review_lines(result.get("label_review"), result["label_key"])
    lines += ["", "## Figures", ""]
    for title, file in result["figures"].items():
        lines += [f"### {title}", "", f"![{title}]({file})", ""]
    lines.append(f"_{result['seconds']} s; all numbers in metrics.json._")
    return "\n".join(lines) + "\n"


def _review_lines(review: dict | None, label_key: str) -> list[str]:
    """The label-review section: how many evaluated cells disagree with their neighbours, and where."""
    if not review:
        return []
    lines = [
        "",
        "## Label review",
        "",
        f"{review['flagged']:,} of {review['cells']:,} evaluated cells ({review['flagged_share']:.1%}) have fewer "
        f"than {review['min_agreement']:.0%} of their {review['k']} nearest evaluated cells labelled as they are "
        f"(`{label_key}`); `label_review.csv` lists them with their neighbours' most common label.",
    ]
    if review["unresolved_classes"]:
        lines += [
            "",
            f"Not told apart by this latent (their median cell shares its label with fewer than "
            f"{review['min_class_agreement']:.0%} of its neighbours; none of their cells is listed): "
            + ", ".join(f"`{c}`" for c in review["unresolved_classes"]),
        ]
    if review["trained_on_labels"]:
        lines += [
            "",
            f"This run was trained on `{label_key}`: its latent pulls a cell toward its given label's cluster, "
            "wrong labels too, so it finds few of them. Review the embedding of a run trained without this label key.",
        ]
    elif review["flagged"]:
        lines += [
            "",
            f"`bigatlas review` lists every such cell of the embedding (this section covers the evaluated subsample); "
            f"`bigatlas train … --label-keys {label_key} --drop-labels {label_key}=<that list>` then trains without "
            "their labels.",
        ]
    classes = [(c, v) for c, v in review["per_class"].items() if v["flagged"]][:20]
    if classes:
        lines += ["", "| label | cells | flagged | share | most suggested |", "|---|---|---|---|---|"]
        lines += [
            f"| {c} | {v['cells']:,} | {v['flagged']:,} | {v['flagged_share']:.1%} | {v['suggested']} |"
            for c, v in classes
        ]
    return lines


def _transfer_lines(transfer: dict) -> list[str]:
    """The label-transfer section: per predictor accuracy / macro-F1 on cells of classes the run knows,
    calibration, Unknown calls (with the accuracy of the cells kept), the uncertainty's ranking of errors (AURC) and
    unseen-class detection."""
    if not transfer:
        return []
    lines = [
        "",
        "## Label transfer (cells of classes the run was trained on)",
        "",
        "| prediction vs known | chosen acc / F1 | head acc / F1 | kNN acc / F1 | ECE | Unknown | acc. not Unknown | "
        "AURC | unseen classes: AUROC, Unknown |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in transfer.items():
        pair = [
            f"{_fmt(s[p]['accuracy'])} / {_fmt(s[p]['macro_f1'])}" if p in s else "–" for p in ("chosen", "head", "knn")
        ]
        unseen = "–"
        if s.get("unseen_classes"):
            names = ", ".join(s["unseen_classes"])
            unseen = f"{_fmt(s.get('unseen_auroc'))}, {_fmt(s.get('unknown_fraction_unseen'))} ({names})"
        lines.append(
            f"| {name} | {' | '.join(pair)} | {_fmt(s.get('ece'))} | {_fmt(s.get('unknown_fraction'))} | "
            f"{_fmt(s.get('accuracy_not_unknown'))} | {_fmt(s.get('aurc'), 4)} | {unseen} |"
        )
    for name, s in transfer.items():
        recall = ", ".join(f"{c} {r:.3f}" for c, r in s["recall_per_class"].items())
        lines += ["", f"Recall per class, {name}: {recall}"]
    return lines


def _html_inline(text: str) -> str:
    """Markdown's inline marks used above (`code`, **bold**) as HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", text)


def to_html(md: str) -> str:
    """The report's own small markdown subset (headings, lists, tables, images) as one HTML page."""
    body, table = [], []

    def flush():
        if table:
            head, *rest = table
            body.append(
                "<table><tr>"
                + "".join(f"<th>{_html_inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                + "</table>"
            )
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_html_inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_html_inline(line[2:])}</li>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}">')
        elif line.strip():
            body.append(f"<p>{_html_inline(line.strip('_'))}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>bigatlas evaluation</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(folder: Path, result: dict, run: Path | None) -> None:
    md = markdown(result, run)
    (folder / "report.md").write_text(md)
    (folder / "report.html").write_text(to_html(md))
