"""Differential expression between groups of cells from the model's decoded expression (scvi-tools' "change"
mode, with its column names).

For each group, up to `n_draws` expression vectors: the group's cells (all of them, or `n_draws` drawn without
replacement), each decoded from draws of its posterior (so many per cell that they make `n_draws`) at library size
1. Log2-fold changes of `n_pairs` random pairs of one group's vectors and the other's give each gene's
distribution of change: `proba_de` = P(|lfc| >= delta), `bayes_factor` = its log odds, and the lfc's mean,
median, spread and range. Genes are called DE (`is_de_fdr_<target>`) by the posterior expected false discovery
rate: the most probable genes, as many as keep the mean of their (1 - proba_de) at or below the target. Beside
them, the groups' raw counts (of the cells decoded): mean, mean per 10,000 counts and share of cells with any.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .model import draw

GENE_BLOCK = 1024  # genes per block of pairwise changes (n_pairs x block floats at a time)


def comparisons(groups: pd.Series, group1=None, group2=None) -> list[tuple[str, list, list]]:
    """(name, group1's values, group2's values) of each comparison: every value against the rest (group1 unset),
    group1 against the rest (group2 unset), or group1 against group2; each a value or a list of them."""
    values = [str(v) for v in pd.Categorical(groups.dropna().astype(str)).categories]
    if len(values) < 2:
        raise ValueError(f"the cells make {len(values)} group{'s' * (len(values) != 1)} ({', '.join(values)}): "
                         "differential expression compares two")  # fmt: skip
    if group1 is None:
        if group2 is not None:
            raise ValueError("group2 needs group1: the groups compared with it")
        return [(f"{v} vs rest", [v], [w for w in values if w != v]) for v in values]
    one = _values(group1, values, "group1")
    two = [w for w in values if w not in one] if group2 is None else _values(group2, values, "group2")
    if set(one) & set(two):
        raise ValueError(f"group1 and group2 share {sorted(set(one) & set(two))}")
    if not two:
        raise ValueError(f"no cells outside group1 {one} to compare it with")
    name = f"{' + '.join(one)} vs {'rest' if group2 is None else ' + '.join(two)}"
    return [(name, one, two)]


def groups_of_cells(idx1, idx2, n_cells: int) -> tuple[pd.Series, str, str | None]:
    """(groups, group1, group2) for cells given as scvi-tools' idx1 / idx2 (boolean masks or positions): "idx1"
    and "idx2", or "rest" for the other cells where idx2 is unset."""
    one, two = _mask(idx1, n_cells, "idx1"), None if idx2 is None else _mask(idx2, n_cells, "idx2")
    if two is not None and (one & two).any():
        raise ValueError(f"idx1 and idx2 share {(one & two).sum()} cells")
    other = np.full(n_cells, "rest" if two is None else None, dtype=object)
    if two is not None:
        other[two] = "idx2"
    groups = pd.Series(np.where(one, "idx1", other))
    return groups, "idx1", None if two is None else "idx2"


def _mask(cells, n_cells: int, what: str) -> np.ndarray:
    cells = np.asarray(cells)
    if cells.dtype == bool:
        if cells.shape != (n_cells,):
            raise ValueError(f"{what}: a boolean mask of {len(cells)} values for {n_cells} cells")
        return cells
    mask = np.zeros(n_cells, bool)
    mask[cells.astype(np.int64)] = True
    return mask


def _values(given, values: list[str], what: str) -> list[str]:
    given = [str(given)] if isinstance(given, str) or not np.iterable(given) else [str(g) for g in given]
    unknown = [g for g in given if g not in values]
    if unknown:
        shown = ", ".join(values[:10]) + (f" and {len(values) - 10} more" if len(values) > 10 else "")
        raise ValueError(f"{what}: {', '.join(map(repr, unknown))} not among the groups ({shown})")
    return given


def pick_cells(groups: pd.Series, members: list[str], n_draws: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(sorted positions of the cells decoded for `members`, posterior draws per cell): all of the group's cells
    up to n_draws of them, else n_draws drawn without replacement."""
    cells = np.flatnonzero(groups.astype(str).isin(members).to_numpy() & groups.notna().to_numpy())
    if len(cells) == 0:
        raise ValueError(f"no cells in {members}")
    if len(cells) > n_draws:
        cells = np.sort(rng.choice(cells, n_draws, replace=False))
    return cells, -(-n_draws // len(cells))


class RawStats:
    """Per-gene sums of a group's raw counts, as the decoded cells' counts stream by."""

    def __init__(self, n_genes: int):
        self.sum, self.normalized, self.nonzero, self.cells = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes), 0

    def add(self, cols: np.ndarray, values: np.ndarray, per_10k: np.ndarray, n_cells: int) -> None:
        """One batch's nonzeros: their genes, counts and counts scaled to 10,000 per cell."""
        self.sum += np.bincount(cols, values, len(self.sum))
        self.normalized += np.bincount(cols, per_10k, len(self.sum))
        self.nonzero += np.bincount(cols, minlength=len(self.sum))
        self.cells += n_cells

    def columns(self, suffix: str) -> dict[str, np.ndarray]:
        n = max(self.cells, 1)
        return {f"raw_mean{suffix}": self.sum / n, f"non_zeros_proportion{suffix}": self.nonzero / n,
                f"raw_normalized_mean{suffix}": self.normalized / n}  # fmt: skip


@torch.no_grad()
def decode_draws(module, batches, per_cell: int, codes_of, n_genes: int, generator) -> tuple[np.ndarray, RawStats]:
    """(decoded expression at library size 1 of `per_cell` posterior draws of each cell of `batches` (ModelInputs),
    draws × genes; RawStats of the cells' counts). codes_of(inp, z): the batch codes to decode each cell under
    (several are averaged)."""
    parts, raw = [], RawStats(n_genes)
    for inp in batches:
        c = inp.counts
        q_mu, q_var = module.posterior(c, measured=inp.measured)
        codes = [b.repeat(per_cell, 1) for b in codes_of(inp, q_mu)]  # each cell's draws decoded in one call
        z = draw(q_mu.repeat(per_cell, 1), q_var.repeat(per_cell, 1), generator)
        ones = torch.ones(len(z), device=z.device, dtype=c.library.dtype)
        parts.append((sum(module.decode(z, b, ones)[0] for b in codes) / len(codes)).float().cpu().numpy())
        values, library = c.values.double().cpu().numpy(), c.library.double().cpu().numpy()
        per_10k = values / np.maximum(library[c.rows.long().cpu().numpy()], 1e-12) * 1e4
        raw.add(c.cols.long().cpu().numpy(), values, per_10k, len(c.library))
    if not parts:
        return np.zeros((0, n_genes), np.float32), raw
    return np.concatenate(parts), raw


def change(h1: np.ndarray, h2: np.ndarray, *, delta: float, pseudocounts: float, n_pairs: int, fdr_target: float,
           rng: np.random.Generator) -> pd.DataFrame:  # fmt: skip
    """Per gene (columns of h1 / h2: the two groups' decoded expression, draws × genes) the change statistics."""
    i, j = rng.integers(0, len(h1), n_pairs), rng.integers(0, len(h2), n_pairs)
    stats = {k: np.empty(h1.shape[1]) for k in ("proba_de", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max")}
    for lo in range(0, h1.shape[1], GENE_BLOCK):
        cols = slice(lo, lo + GENE_BLOCK)
        lfc = np.log2(h1[i, cols] + pseudocounts) - np.log2(h2[j, cols] + pseudocounts)
        stats["proba_de"][cols] = (np.abs(lfc) >= delta).mean(0)
        stats["lfc_mean"][cols], stats["lfc_median"][cols] = lfc.mean(0), np.median(lfc, 0)
        stats["lfc_std"][cols], stats["lfc_min"][cols], stats["lfc_max"][cols] = lfc.std(0), lfc.min(0), lfc.max(0)
    p = stats["proba_de"]
    table = pd.DataFrame(
        {
            "proba_de": p,
            "proba_not_de": 1.0 - p,
            "bayes_factor": np.log(p + 1e-8) - np.log(1.0 - p + 1e-8),
            "scale1": h1.mean(0),
            "scale2": h2.mean(0),
            "pseudocounts": pseudocounts,
            "delta": delta,
            **{k: v for k, v in stats.items() if k != "proba_de"},
        }  # fmt: skip
    )
    table[f"is_de_fdr_{fdr_target}"] = fdr_calls(p, fdr_target)
    return table


def fdr_calls(proba_de: np.ndarray, target: float) -> np.ndarray:
    """The genes called DE at posterior expected FDR `target`: the k most probable, k the largest whose mean
    (1 - proba_de) is at most the target."""
    order = np.argsort(-proba_de, kind="stable")
    expected = np.cumsum(1.0 - proba_de[order]) / np.arange(1, len(order) + 1)
    k = int(np.flatnonzero(expected <= target)[-1]) + 1 if (expected <= target).any() else 0
    called = np.zeros(len(proba_de), dtype=bool)
    called[order[:k]] = True
    return called


def differential_table(groups: pd.Series, group1, group2, decode_sides, genes, names, *, n_draws: int, delta: float,
                       pseudocounts: float, n_pairs: int, fdr_target: float, seed: int) -> pd.DataFrame:  # fmt: skip
    """The comparisons' tables, one after the other, each the most probably changed genes first. `decode_sides(sides)`:
    for [(positions, draws per cell)] of the two groups, [(decoded draws, RawStats)]."""
    rng, tables = np.random.default_rng(seed), []
    for name, one, two in comparisons(groups, group1, group2):
        (h1, raw1), (h2, raw2) = decode_sides([pick_cells(groups, members, n_draws, rng) for members in (one, two)])
        table = change(h1, h2, delta=delta, pseudocounts=pseudocounts, n_pairs=n_pairs, fdr_target=fdr_target,
                       rng=rng)  # fmt: skip
        table = table.assign(**raw1.columns("1"), **raw2.columns("2"), comparison=name, group1=" + ".join(one),
                             group2=" + ".join(two))  # fmt: skip
        table.index = pd.Index(genes, name="gene")
        if any(names):
            table.insert(0, "gene_name", names)
        tables.append(table.sort_values(["proba_de", "lfc_mean"], ascending=False, key=_abs_if_lfc))
    return pd.concat(tables)


def _abs_if_lfc(column: pd.Series) -> pd.Series:
    """The tables' order: by proba_de, then by the size of the change either way."""
    return column.abs() if column.name == "lfc_mean" else column
