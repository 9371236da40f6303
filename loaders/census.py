"""`census:<version>[/<organism>]` data specs: the CELLxGENE Census, opened with cellxgene_census.

The Census is a SOMA collection on S3 with one experiment per organism; a spec resolves to that
experiment's URI plus the TileDB settings cellxgene_census opens it with (anonymous S3, region),
and the ordinary SomaStore reads it. Offline, resolving fails with one line that says so.
"""

from __future__ import annotations

from .store import StoreError

PREFIX = "census:"
DEFAULT_ORGANISM = "homo_sapiens"


def is_census(uri: str) -> bool:
    return str(uri).startswith(PREFIX)


def census_spec(data: str, organism: str | None) -> str:
    """`data` with `organism` folded in when it is a Census spec (`census:stable` + 'Mus musculus'
    → `census:stable/mus_musculus`); other data is returned unchanged, with organism refused."""
    if not is_census(data):
        if organism:
            raise StoreError(f"--organism applies to census:<version> data, not to {data}")
        return data
    version, _, org = data[len(PREFIX) :].partition("/")
    org = organism or org or DEFAULT_ORGANISM
    return f"{PREFIX}{version or 'stable'}/{org.strip().lower().replace(' ', '_')}"


def resolve(spec: str) -> tuple[str, dict]:
    """(experiment URI, TileDB config) of a Census spec; StoreError when it cannot be opened."""
    spec = census_spec(spec, None)
    version, _, organism = spec[len(PREFIX) :].partition("/")
    try:
        import cellxgene_census
    except ImportError:
        raise StoreError(f"{spec} needs the cellxgene-census package: pip install 'bigatlas[census]'") from None
    try:
        census = cellxgene_census.open_soma(census_version=version)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise StoreError(
            f"cannot open CELLxGENE Census version {version!r} (offline or unknown version?): "
            f"{type(e).__name__}: {first}"
        ) from None
    with census:
        data = census["census_data"]
        if organism not in data:
            raise StoreError(f"Census {version} has no organism {organism!r} (have: {', '.join(sorted(data.keys()))})")
        uri = data[organism].uri
        config = {k: str(v) for k, v in census.context.tiledb_config.items() if k.startswith("vfs.s3.")}
    return uri, config
