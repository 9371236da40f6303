"""Synthetic atlas: ZINB counts from a low-rank program model with Census-like obs/var.

Cell types form a 2-level hierarchy (coarse → fine); studies contain donors; each study and donor
multiplies gene means by its own log-normal effect (strong, as between real studies); library sizes
vary by study and cell. About 7% of cells carry the label 'undefined'; `true_cell_type` keeps the
truth. Cell metadata is drawn first (a few ints per cell), then counts are drawn and written chunk
by chunk, so memory is bounded by one chunk whatever the number of cells.

Presets (`PRESETS`, `bigatlas synth --preset`) make it hard where real atlases are: `subtle` subtypes
that differ in a handful of genes, with wide library sizes and strong overdispersion; `rare` types
under 1% of cells; `condition` — a treatment that changes the programs of some coarse types only,
given to some donors of every study, and batch effects that hit each coarse type differently; `hard`
all of these at once. `truth(spec)` returns what each preset claims (marker genes per fine type, the
condition's response genes and types), drawn from the same seed. The default atlas is unchanged by
the new options: they draw from a random stream of their own.

`continuous` makes cell identity graded, as in blood, where naive and memory T cells or classical and
non-classical monocytes are ends of a continuum rather than islands: the subtypes of each coarse type
are stations along a path, each cell sits at a position on it (`true_pseudotime`, 0 to
n_fine_per_coarse; its subtype is the segment it falls in) and expresses the blend of the two nearest
subtypes' programs, so cells near a boundary are half one subtype, half the next; and every cell carries
an activation programme shared by all types at a graded level (`true_state`, 0 to 1) whose distribution
differs between studies (some studies sampled more activated cells): biology that looks like batch.

`ambient` adds what separates real studies besides gene-wise effects: ambient RNA, a soup of each study's
own cells (its types in their proportions) that makes up a share of every cell's counts (around 10%, the
study's mean a quarter to 1.75 times that; `Truth.ambient`), so every cell of a study carries some of the
markers of the study's common types; and mean library sizes that differ 2-3x between studies, as between
assays.

`tissues` gives the studies the compositions of different tissues: the last `tissue_types` coarse types are
each resident in one tissue (`tissue_general`, study i is tissue i mod 3) and absent from the other tissues'
studies (`Truth.present`, obs `tissue_resident`), with stronger study effects. Each resident type is the twin
of a type every study has (`Truth.twin`; the k-th from the end copies coarse type k and its subtypes) plus a
programme of its own (`resident_genes` genes, `Truth.resident_genes`), as alveolar macrophages are monocyte-
derived cells found in lung studies only. Told apart from its twin by a difference that goes with the tissue,
hence with the study: a model that removes too much of the study folds the resident type into its twin.

`draw` returns everything drawn before the counts and `cell_probs` a chunk's expression profiles for any types,
so `synth_oracle` can compute each cell's exact posterior over its type (the atlas's Bayes bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

ASSAYS = ["10x 3' v3", "10x 3' v2", "10x 5' v1"]
TISSUES = ["blood", "lung", "kidney"]


@dataclass(frozen=True)
class SynthSpec:
    n_cells: int
    n_genes: int = 2000
    n_coarse: int = 4
    n_fine_per_coarse: int = 3
    n_studies: int = 6
    donors_per_study: int = 4
    study_effect: float = 0.6  # sd of per-study gene log-fold changes
    donor_effect: float = 0.2
    mean_library: float = 2500.0
    undefined_fraction: float = 0.07
    zero_inflation: float = 0.05  # mean per-gene structural-zero probability
    order: str = "study"  # storage order: study (concatenated datasets), cell_type (sorted), random
    seed: int = 0
    subtype_genes: int | None = None  # genes in each fine type's own program (unset: n_genes // 40)
    subtype_lfc: float = 1.5  # mean log-fold change of those genes
    library_sd: float = 0.35  # sd of log library size between cells of a study
    log_theta_mean: float = 1.0  # mean log NB inverse dispersion (lower: more overdispersed)
    rare_types: int = 0  # fine types made rare: rare_fraction of every study's cells each
    rare_fraction: float = 0.005
    condition_types: int = 0  # coarse types whose programs a treatment changes (treated: odd donors)
    condition_genes: int = 30
    condition_lfc: float = 1.0  # mean |log-fold change| of the response genes
    type_batch_effect: float = 0.0  # sd of per (study, coarse type) gene log-fold changes
    trajectory: bool = False  # subtypes of a coarse type are stations on a path; cells blend neighbours
    state_genes: int = 0  # genes of an activation programme every type carries at a graded level
    state_lfc: float = 1.5  # mean log-fold change of those genes at full activation
    study_library_sd: float = 0.4  # sd of log mean library size between studies (assays differ 2-3x)
    ambient: float = 0.0  # mean share of a cell's counts from its study's soup (ambient RNA), study means vary
    tissue_types: int = 0  # last coarse types, each resident in one tissue's studies only (study i: tissue i % 3)
    resident_genes: int = 20  # genes of a resident type's own programme, beside its shared twin's
    resident_lfc: float = 1.5  # mean log-fold change of those genes

    def __post_init__(self):
        if self.rare_types > min(self.n_coarse, self.n_fine - 1) or self.rare_types * self.rare_fraction >= 0.5:
            raise ValueError(f"rare_types={self.rare_types} x {self.rare_fraction}: at most one per coarse type")
        if self.condition_types > self.n_coarse:
            raise ValueError(f"condition_types={self.condition_types} exceeds n_coarse={self.n_coarse}")
        shared = self.n_coarse - self.tissue_types
        if self.tissue_types and (max(self.rare_types, self.tissue_types) > shared or self.n_studies < len(TISSUES)):
            raise ValueError(
                f"tissue_types={self.tissue_types}: needs rare_types and tissue_types <= n_coarse - tissue_types "
                f"(a twin each) and n_studies >= {len(TISSUES)} (every tissue has a study)"
            )
        if self.trajectory and self.n_fine_per_coarse < 2:
            raise ValueError("trajectory needs n_fine_per_coarse >= 2 (a path between subtypes)")

    @property
    def n_fine(self) -> int:
        return self.n_coarse * self.n_fine_per_coarse

    @property
    def fine_names(self) -> list[str]:
        """The fine types' labels, by index: type_<coarse>.<subtype>."""
        return [f"type_{f // self.n_fine_per_coarse}.{f % self.n_fine_per_coarse}" for f in range(self.n_fine)]


# Realistic difficulties (see the module docstring); a preset is a set of SynthSpec fields.
_SUBTLE = dict(subtype_genes=6, subtype_lfc=1.3, library_sd=0.6, log_theta_mean=0.3, zero_inflation=0.1)
PRESETS: dict[str, dict] = {
    "default": {},
    "subtle": _SUBTLE,
    "rare": dict(subtype_genes=15, rare_types=3, rare_fraction=0.005, library_sd=0.5),
    "condition": dict(
        subtype_genes=15, condition_types=2, condition_genes=40, condition_lfc=1.2, type_batch_effect=0.3,
        donor_effect=0.35,
    ),
    "continuous": dict(subtype_genes=15, trajectory=True, state_genes=40, state_lfc=1.5, library_sd=0.5),
    "ambient": dict(subtype_genes=15, library_sd=0.5, study_library_sd=0.8, ambient=0.1),
    "tissues": dict(n_coarse=5, tissue_types=2, subtype_genes=15, library_sd=0.5, study_effect=0.8),
    "hard": dict(
        _SUBTLE, subtype_genes=8, rare_types=2, rare_fraction=0.006, condition_types=2, condition_genes=40,
        condition_lfc=1.2, type_batch_effect=0.3, donor_effect=0.35,
    ),
}  # fmt: skip


def preset(name: str, n_cells: int, n_genes: int = 2000, **overrides) -> SynthSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown synth preset {name!r} (have: {', '.join(PRESETS)})")
    return SynthSpec(n_cells=n_cells, n_genes=n_genes, **{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class Truth:
    markers: list[np.ndarray]  # per fine type: genes of its own program (not its coarse type's)
    rare: np.ndarray  # fine type indices made rare
    affected: np.ndarray  # coarse types the condition changes
    response: np.ndarray  # genes the condition changes
    response_lfc: np.ndarray  # their log-fold changes
    state: np.ndarray  # genes of the graded activation programme
    state_lfc: np.ndarray  # their log-fold changes at full activation
    ambient: np.ndarray  # per study: the mean share of a cell's counts from the study's soup
    present: np.ndarray  # studies x coarse types: whether the study has cells of that type at all
    twin: np.ndarray  # per coarse type: the shared type a resident one copies (-1: not resident)
    resident_genes: list[np.ndarray]  # per coarse type: the genes of a resident type's own programme (else empty)


def _extra_rng(spec: SynthSpec) -> np.random.Generator:
    return np.random.default_rng([spec.seed, 0x5EED])


def _rare_types(spec: SynthSpec) -> np.ndarray:
    """The last subtype of the first `rare_types` coarse types: rare *and* beside a common sibling."""
    return np.arange(spec.rare_types) * spec.n_fine_per_coarse + spec.n_fine_per_coarse - 1


def truth(spec: SynthSpec) -> Truth:
    """What the atlas of `spec` holds by construction (the same draws as `generate`)."""
    rng = np.random.default_rng(spec.seed)
    logits, _, _, markers = _programs(spec, rng)
    _, twin, own = _resident_programs(spec, logits)
    F = spec.n_fine_per_coarse
    for r in np.flatnonzero(twin >= 0):  # a resident type's subtypes have their twin's subtype programs
        markers[r * F : (r + 1) * F] = markers[twin[r] * F : (twin[r] + 1) * F]
    genes, lfc = _condition(spec, _extra_rng(spec))
    state, state_lfc = _state_programme(spec, _continuous_rng(spec))
    return Truth(
        markers, _rare_types(spec), np.arange(spec.condition_types), genes, lfc, state, state_lfc,
        _ambient_shares(spec), _present(spec), twin, own,
    )  # fmt: skip


def _resident_programs(spec: SynthSpec, logits: np.ndarray):
    """The tissues preset's resident types: the k-th coarse type from the end takes coarse type k's programs
    (subtype by subtype) plus `resident_genes` genes of its own, from a stream of its own. Returns the new
    log-means, each coarse type's twin (-1: none) and own genes (empty: none)."""
    twin = np.full(spec.n_coarse, -1)
    own = [np.zeros(0, np.int64) for _ in range(spec.n_coarse)]
    if not spec.tissue_types:
        return logits, twin, own
    rng, F, logits = np.random.default_rng([spec.seed, 0x715E]), spec.n_fine_per_coarse, logits.copy()
    for k in range(spec.tissue_types):
        r = spec.n_coarse - 1 - k
        twin[r] = k
        own[r], lfc = _gene_programme(spec, rng, spec.resident_genes, spec.resident_lfc)
        logits[r * F : (r + 1) * F] = logits[k * F : (k + 1) * F]
        logits[r * F : (r + 1) * F, own[r]] += np.abs(lfc)
    return logits, twin, own


def _present(spec: SynthSpec) -> np.ndarray:
    """Studies x coarse types: True where the study can have cells of the type. The last `tissue_types`
    coarse types are resident: the k-th from the end only in the studies of tissue k (study i: i % 3)."""
    present = np.ones((spec.n_studies, spec.n_coarse), bool)
    tissue = np.arange(spec.n_studies) % len(TISSUES)
    for k in range(spec.tissue_types):
        present[:, spec.n_coarse - 1 - k] = tissue == k % len(TISSUES)
    return present


def _ambient_shares(spec: SynthSpec) -> np.ndarray:
    """Per study, the mean share of a cell's counts that come from the study's soup: around `ambient`, a
    quarter to 1.75 times it (zeros without ambient RNA). A stream of its own: the other draws stay."""
    if spec.ambient <= 0:
        return np.zeros(spec.n_studies)
    rng = np.random.default_rng([spec.seed, 0xA3B1E7])
    return np.clip(spec.ambient * rng.uniform(0.25, 1.75, spec.n_studies), 1e-3, 0.6)


def _soups(spec: SynthSpec, logits, study_fx, study, ctype) -> np.ndarray:
    """Per study, the expression profile of its ambient RNA: its cells' types in their proportions, with the
    study's own gene effects (cells lysed in the same suspension, measured by the same assay)."""
    soups = np.zeros((spec.n_studies, spec.n_genes), np.float32)
    for s in range(spec.n_studies):
        share = np.bincount(ctype[study == s], minlength=spec.n_fine) / max((study == s).sum(), 1)
        eta = logits + study_fx[s]
        p = np.exp(eta - eta.max(axis=1, keepdims=True))
        soups[s] = share @ (p / p.sum(axis=1, keepdims=True))
    return soups


def _continuous_rng(spec: SynthSpec) -> np.random.Generator:
    return np.random.default_rng([spec.seed, 0xC0DE])


def _gene_programme(spec: SynthSpec, rng: np.random.Generator, n_genes: int, lfc: float):
    """`n_genes` distinct genes (sorted) and their log-fold changes, normal around `lfc` (sd lfc / 4)."""
    genes = np.sort(rng.choice(spec.n_genes, min(n_genes, spec.n_genes), replace=False))
    return genes, rng.normal(lfc, 0.25 * lfc, len(genes))


def _state_programme(spec: SynthSpec, rng: np.random.Generator):
    if not spec.state_genes:
        return np.zeros(0, np.int64), np.zeros(0)
    genes, lfc = _gene_programme(spec, rng, spec.state_genes, spec.state_lfc)
    return genes, np.abs(lfc)


def _positions(spec: SynthSpec, rng: np.random.Generator, study: np.ndarray, ctype: np.ndarray):
    """Per cell: position on its coarse type's path (subtype + uniform offset; None without trajectory)
    and activation level (Beta around a per-study mean; None without a state programme)."""
    pos = state = None
    if spec.trajectory:
        pos = (ctype % spec.n_fine_per_coarse + rng.random(len(ctype))).astype(np.float32)
    if spec.state_genes:
        mean = rng.uniform(0.15, 0.85, spec.n_studies)[study]
        state = rng.beta(5.0 * mean, 5.0 * (1.0 - mean)).astype(np.float32)
    return pos, state


def _blend(spec: SynthSpec, logits: np.ndarray, t: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Log-means of cells at positions `pos`: linear between the programs of the two subtypes whose
    centres (k + 0.5) enclose the position; the path's ends keep the end subtypes' programs."""
    F = spec.n_fine_per_coarse
    x = np.clip(pos - 0.5, 0.0, F - 1.0)
    lo = np.minimum(np.floor(x).astype(np.int64), F - 2)
    w = (x - lo)[:, None]
    first = (t // F) * F
    return (1.0 - w) * logits[first + lo] + w * logits[first + lo + 1]


def _condition(spec: SynthSpec, rng: np.random.Generator):
    if not spec.condition_types:
        return np.zeros(0, np.int64), np.zeros(0)
    genes, lfc = _gene_programme(spec, rng, spec.condition_genes, spec.condition_lfc)
    return genes, lfc * rng.choice([-1.0, 1.0], len(genes))


def _programs(spec: SynthSpec, rng: np.random.Generator):
    """Gene log-means: base + coarse program + fine program; plus dispersion and gate per gene."""
    G = spec.n_genes
    base = rng.normal(-1.0, 1.2, G)
    coarse = np.zeros((spec.n_coarse, G))
    for c in range(spec.n_coarse):
        genes = rng.choice(G, max(G // 12, 1), replace=False)
        coarse[c, genes] = rng.normal(2.0, 0.6, len(genes))
    n_fine = spec.n_fine
    fine = np.zeros((n_fine, G))
    n_markers = spec.subtype_genes if spec.subtype_genes is not None else G // 40
    markers = []
    for f in range(n_fine):
        genes = rng.choice(G, max(min(n_markers, G), 1), replace=False)
        fine[f, genes] = rng.normal(spec.subtype_lfc, spec.subtype_lfc / 3, len(genes))
        markers.append(np.sort(genes))
    fine += coarse[np.arange(n_fine) // spec.n_fine_per_coarse]
    theta = np.exp(rng.normal(spec.log_theta_mean, 0.8, G))  # NB inverse dispersion
    gate = np.clip(rng.beta(1.0, 1.0 / max(spec.zero_inflation, 1e-6) - 1.0, G), 0, 0.9)
    return base + fine, theta, gate, markers


def _cells(spec: SynthSpec, rng: np.random.Generator):
    n_fine = spec.n_fine
    study = np.sort(rng.integers(0, spec.n_studies, spec.n_cells))
    donor = study * spec.donors_per_study + rng.integers(0, spec.donors_per_study, spec.n_cells)
    # each study has its own cell-type composition, some types nearly absent
    comp = rng.dirichlet(np.full(n_fine, 0.8), spec.n_studies)
    if spec.tissue_types:  # resident types leave other tissues' studies; no draw, so the other atlases stay
        comp *= np.repeat(_present(spec), spec.n_fine_per_coarse, axis=1)
        comp /= comp.sum(1, keepdims=True)
    rare = _rare_types(spec)
    if len(rare):
        common = np.setdiff1d(np.arange(n_fine), rare)
        comp[:, common] *= (1.0 - len(rare) * spec.rare_fraction) / comp[:, common].sum(1, keepdims=True)
        comp[:, rare] = spec.rare_fraction
    u = rng.random(spec.n_cells)
    cum = np.cumsum(comp, axis=1)
    if spec.tissue_types:  # exactly 1 from the last present type on, so no cell lands on an absent one
        cum /= cum[:, -1:]
    ctype = np.minimum((u[:, None] > cum[study]).sum(1), n_fine - 1)
    if spec.order == "cell_type":
        perm = np.lexsort((study, ctype))
    elif spec.order == "random":
        perm = rng.permutation(spec.n_cells)
    elif spec.order == "study":
        perm = np.lexsort((donor, study))
    else:
        raise ValueError(f"order must be study, cell_type or random, not {spec.order!r}")
    return study[perm], donor[perm], ctype[perm], comp


@dataclass
class Draws:
    """Everything `generate` draws before the counts: gene programmes and effects, each cell's study, donor
    and type, and the nuisances the counts are drawn around (`cell_probs`)."""

    logits: np.ndarray  # fine types x genes: log-means before any effect
    theta: np.ndarray  # per gene: NB inverse dispersion
    gate: np.ndarray  # per gene: structural-zero probability
    study_fx: np.ndarray
    donor_fx: np.ndarray
    study_lib: np.ndarray  # per study: log mean library size
    study: np.ndarray
    donor: np.ndarray
    ctype: np.ndarray  # each cell's fine type
    comp: np.ndarray  # studies x fine types: the composition each study's types were drawn from
    treated: np.ndarray
    condition_fx: np.ndarray  # coarse types x genes: the treatment's effect
    type_fx: np.ndarray | None  # studies x coarse types x genes
    state_fx: np.ndarray
    pos: np.ndarray | None  # per cell: position on its coarse type's path (continuous)
    state: np.ndarray | None  # per cell: activation level
    shares: np.ndarray  # per study: mean ambient share
    soups: np.ndarray | None


def draw(spec: SynthSpec, rng: np.random.Generator) -> Draws:
    """The draws of `generate` from its main stream `rng` (seeded with spec.seed) and the options' own."""
    logits, theta, gate, _ = _programs(spec, rng)
    logits = _resident_programs(spec, logits)[0]
    G, n_donors = spec.n_genes, spec.n_studies * spec.donors_per_study
    study_fx = rng.normal(0, spec.study_effect, (spec.n_studies, G))
    donor_fx = rng.normal(0, spec.donor_effect, (n_donors, G))
    study_lib = np.log(spec.mean_library) + rng.normal(0, spec.study_library_sd, spec.n_studies)
    study, donor, ctype, comp = _cells(spec, rng)
    extra = _extra_rng(spec)
    response, response_lfc = _condition(spec, extra)
    condition_fx = np.zeros((spec.n_coarse, G), np.float32)  # treated cells of affected coarse types
    condition_fx[np.ix_(np.arange(spec.condition_types), response)] = response_lfc
    type_fx = None
    if spec.type_batch_effect > 0:
        type_fx = extra.normal(0, spec.type_batch_effect, (spec.n_studies, spec.n_coarse, G)).astype(np.float32)
    crng_cont = _continuous_rng(spec)
    state_genes, state_lfc = _state_programme(spec, crng_cont)
    state_fx = np.zeros(G, np.float32)
    state_fx[state_genes] = state_lfc
    pos, state = _positions(spec, crng_cont, study, ctype)
    soups = _soups(spec, logits, study_fx, study, ctype) if spec.ambient > 0 else None
    return Draws(
        logits, theta, gate, study_fx, donor_fx, study_lib, study, donor, ctype, comp, _treated(spec, donor),
        condition_fx, type_fx, state_fx, pos, state, _ambient_shares(spec), soups,
    )  # fmt: skip


def cell_probs(spec: SynthSpec, d: Draws, lo: int, hi: int, t: np.ndarray, pos: np.ndarray | None) -> np.ndarray:
    """Expression profiles (rows sum to 1) of cells lo..hi of the chunk that starts at lo, were their fine
    types `t` and their path positions `pos` (continuous; else None); every other draw is theirs."""
    s, dn = d.study[lo:hi], d.donor[lo:hi]
    eta = (d.logits[t] if pos is None else _blend(spec, d.logits, t, pos)) + (d.study_fx[s] + d.donor_fx[dn])
    eta = eta.astype(np.float32)
    if d.state is not None:
        eta += d.state[lo:hi, None] * d.state_fx
    coarse = t // spec.n_fine_per_coarse
    if spec.condition_types:
        eta += d.condition_fx[coarse] * d.treated[lo:hi, None]
    if d.type_fx is not None:
        eta += d.type_fx[s, coarse]
    eta -= eta.max(axis=1, keepdims=True)
    p = np.exp(eta)
    p /= p.sum(axis=1, keepdims=True)
    if d.soups is not None:  # each cell's share of soup: Beta around its study's (own stream: other draws stay)
        m = d.shares[s]
        a = np.random.default_rng([spec.seed, lo, 0xA3B1]).beta(8.0 * m, 8.0 * (1.0 - m)).astype(np.float32)
        p = (1.0 - a[:, None]) * p + a[:, None] * d.soups[s]
    return p


def chunk_library(spec: SynthSpec, d: Draws, lo: int, hi: int, crng: np.random.Generator) -> np.ndarray:
    """The library sizes of cells lo..hi: the first draw of the chunk's own stream `crng`."""
    return np.exp(d.study_lib[d.study[lo:hi]] + crng.normal(0, spec.library_sd, hi - lo)).astype(np.float32)


def chunk_rng(spec: SynthSpec, lo: int) -> np.random.Generator:
    """The stream of the chunk that starts at cell lo: output independent of chunking order."""
    return np.random.default_rng([spec.seed, lo])


CHUNK_CELLS = 8192  # cells a chunk: each chunk draws from its own stream, so this is part of the atlas's identity


def generate(spec: SynthSpec, writer, chunk_cells: int = CHUNK_CELLS) -> None:
    """Draw the atlas and stream it into `writer` (write_store.ZarrWriter or SomaWriter)."""
    rng = np.random.default_rng(spec.seed)
    d = draw(spec, rng)
    for lo in range(0, spec.n_cells, chunk_cells):
        hi = min(lo + chunk_cells, spec.n_cells)
        crng = chunk_rng(spec, lo)
        p = cell_probs(spec, d, lo, hi, d.ctype[lo:hi], None if d.pos is None else d.pos[lo:hi])
        mu = p * chunk_library(spec, d, lo, hi, crng)[:, None]
        counts = crng.negative_binomial(d.theta, d.theta / (d.theta + mu)).astype(np.float32)
        counts[crng.random(counts.shape, dtype=np.float32) < d.gate] = 0
        rows, cols = np.nonzero(counts)
        indptr = np.zeros(hi - lo + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=hi - lo), out=indptr[1:])
        writer.append(indptr, cols, counts[rows, cols])
    obs, var = _frames(spec, d.study, d.donor, d.ctype, rng, d.treated)
    if d.pos is not None:
        obs["true_pseudotime"] = d.pos
    if d.state is not None:
        obs["true_state"] = d.state
    writer.finish(obs, var)


def _treated(spec: SynthSpec, donor: np.ndarray) -> np.ndarray:
    """Odd donors of every study are treated (so every study has both arms when it has 2+ donors)."""
    return (donor % spec.donors_per_study) % 2 == 1


def _frames(spec: SynthSpec, study, donor, ctype, rng, treated):
    n = spec.n_cells
    fine_names = np.array(spec.fine_names)
    coarse_names = np.array([f"type_{c}" for c in range(spec.n_coarse)])
    undefined = rng.random(n) < spec.undefined_fraction
    cell_type = np.where(undefined, "undefined", fine_names[ctype])
    coarse = np.where(undefined, "undefined", coarse_names[ctype // spec.n_fine_per_coarse])
    study_assay = rng.integers(0, len(ASSAYS), spec.n_studies)
    study_tissue = np.arange(spec.n_studies) % len(TISSUES)

    def cat(values):
        return pd.Categorical(values)

    obs = pd.DataFrame(
        {
            "dataset_id": cat(np.char.add("study_", study.astype(str))),
            "donor_id": cat(np.char.add("donor_", donor.astype(str))),
            "assay": cat(np.asarray(ASSAYS)[study_assay[study]]),
            "tissue_general": cat(np.asarray(TISSUES)[study_tissue[study]]),
            "cell_type": cat(cell_type),
            "cell_type_coarse": cat(coarse),
            "true_cell_type": cat(fine_names[ctype]),
            "is_primary_data": rng.random(n) < 0.9,
            "soma_joinid": np.arange(n, dtype=np.int64),
        },
        index=pd.Index(np.char.add("cell_", np.arange(n).astype(str)), name="obs_id"),
    )
    if spec.tissue_types:
        obs["tissue_resident"] = ctype // spec.n_fine_per_coarse >= spec.n_coarse - spec.tissue_types
    if spec.condition_types:
        obs["condition"] = cat(np.where(treated, "treated", "control"))
        obs["condition_affected"] = treated & (ctype // spec.n_fine_per_coarse < spec.condition_types)
    g = np.arange(spec.n_genes)
    var = pd.DataFrame(
        {
            "feature_id": np.char.add("ENSSYN", np.char.zfill(g.astype(str), 11)),
            "feature_name": np.char.add("GENE", g.astype(str)),
            "soma_joinid": g.astype(np.int64),
        },
        index=pd.Index(np.char.add("ENSSYN", np.char.zfill(g.astype(str), 11)), name="gene_id"),
    )
    return obs, var


def synth(
    out,
    n_cells: int,
    n_genes: int,
    fmt: str = "zarr",
    seed: int = 0,
    overwrite: bool = False,
    preset_name: str = "default",
    **spec_kwargs,
):
    """Write the atlas of `preset_name` (PRESETS), with SynthSpec fields in spec_kwargs overriding it."""
    from .write_store import SomaWriter, ZarrWriter

    spec = preset(preset_name, n_cells, n_genes, seed=seed, **spec_kwargs)
    if fmt == "zarr":
        writer = ZarrWriter(out, n_genes, overwrite=overwrite)
    elif fmt == "soma":
        writer = SomaWriter(out, n_cells, n_genes, overwrite=overwrite)
    else:
        raise ValueError(f"format must be zarr or soma, not {fmt!r}")
    with writer:
        generate(spec, writer)
    return spec
