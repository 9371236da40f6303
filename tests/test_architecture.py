"""The import graph: scripts → bigatlas → loaders, never back; the torch module stands alone; no
circles. Read from the source (every import, also function-local ones), so a hidden import counts."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bigatlas", "loaders")


def imports_of(path: Path) -> set[str]:
    """Modules of our packages that `path` imports, as 'package.module'."""
    package = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = f"{package}.{node.module}" if node.module else package
                names = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
            elif node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in PACKAGES and len(parts) >= 2 and (ROOT / parts[0] / f"{parts[1]}.py").exists():
                found.add(".".join(parts[:2]))
            elif parts[0] in PACKAGES:
                found.add(parts[0])
    return found


def graph() -> dict[str, set[str]]:
    g = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            g[name] = imports_of(path) - {name}
    return g


def reachable(g, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in g.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_loaders_never_import_bigatlas():
    g = graph()
    bad = {m: sorted(d) for m, d in g.items() if m.startswith("loaders") and any(x.startswith("bigatlas") for x in d)}
    assert not bad, bad


@pytest.mark.parametrize("module", ["bigatlas.model", "bigatlas.distributions"])
def test_the_model_never_reaches_the_stream_the_trainer_or_the_api(module):
    reach = reachable(graph(), module)
    forbidden = {"loaders.stream", "bigatlas.train", "bigatlas.api", "bigatlas.infer", "bigatlas.rundir"}
    assert not reach & forbidden, sorted(reach & forbidden)


def test_nothing_imports_the_api_back():
    g = graph()
    users = sorted(m for m, deps in g.items() if "bigatlas.api" in deps and m != "bigatlas")
    assert users == [], users


def test_no_import_circles():
    g = graph()
    circles = sorted(m for m in g if m in reachable(g, m))
    assert circles == [], f"modules that import themselves through a circle: {circles}"


def test_the_checker_sees_a_circle(tmp_path):
    """The circle check can fail: a two-module circle is found."""
    g = {"a.x": {"a.y"}, "a.y": {"a.x"}}
    assert "a.x" in reachable(g, "a.x")
