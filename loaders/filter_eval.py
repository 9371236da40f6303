"""obs_filter for stores without a query engine (AnnData-Zarr, .h5ad, AnnData in memory), evaluated the way
TileDB evaluates a SOMA value_filter: the same Python-expression syntax (comparisons, `in` / `not in` lists,
`and` / `or` / `not`, `&` / `|`, parentheses) and SQL's three-valued logic, in which a comparison with a missing
value (NaN, None, <NA>) is unknown, `not` of unknown too, and only rows known true are selected: a filter selects
the same cells whichever format holds them. pandas' own eval selected a missing value wherever a categorical or
string column was compared with `!=` or `not in`.
"""

from __future__ import annotations

import ast
import operator

import numpy as np
import pandas as pd

COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}  # fmt: skip


class FilterSyntaxError(ValueError):
    pass


def evaluate(expr: str, columns: dict, n: int) -> np.ndarray:
    """The boolean mask of the n rows `expr` selects; `columns` maps each column name it uses to its values.
    Three-valued, as TileDB (and SQL): a comparison with a missing value is unknown, `not` of unknown is unknown,
    `and` / `or` combine them by Kleene's rules, and only rows known true are selected."""
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as e:
        raise FilterSyntaxError(f"not a filter expression ({e.msg})") from None
    true, _ = _truth(tree, columns, n)
    return true


def _as_boolop(node):
    """`a & b` / `a | b` (TileDB reads them as `and` / `or`) as the BoolOp they mean; other nodes as they are."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr):
        op = ast.And() if isinstance(node.op, ast.BitAnd) else ast.Or()
        return ast.BoolOp(op=op, values=[node.left, node.right])
    return node


def _truth(node, columns: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(known true, unknown) per row."""
    node = _as_boolop(node)
    if isinstance(node, ast.BoolOp):
        combine = _and if isinstance(node.op, ast.And) else _or
        out = _truth(node.values[0], columns, n)
        for v in node.values[1:]:
            out = combine(out, _truth(v, columns, n))
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        true, unknown = _truth(node.operand, columns, n)
        return ~true & ~unknown, unknown
    if isinstance(node, ast.Compare):
        out, left = (np.ones(n, bool), np.zeros(n, bool)), node.left
        for op, right in zip(node.ops, node.comparators, strict=True):  # a < x < b: both comparisons
            out, left = _and(out, _compare(left, op, right, columns, n)), right
        return out
    if isinstance(node, ast.Name) and node.id in columns:  # a boolean column on its own
        true, present = _per_cell(pd.Series(columns[node.id]), lambda v: v == True)  # noqa: E712
        return true & present, ~present
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return np.full(n, node.value), np.zeros(n, bool)
    raise FilterSyntaxError(f"{ast.unparse(node)!r} is not a comparison, `in` list, and / or / not of them")


def _and(a, b):
    """Kleene's and of two (known true, unknown) pairs: false where either is known false, else unknown where
    either is unknown."""
    (ta, ua), (tb, ub) = a, b
    false = (~ta & ~ua) | (~tb & ~ub)
    return ta & tb, ~(ta & tb) & ~false


def _or(a, b):
    """Kleene's or: true where either is known true, else unknown where either is unknown."""
    (ta, ua), (tb, ub) = a, b
    true = ta | tb
    return true, (ua | ub) & ~true


def _compare(left, op, right, columns: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(op, ast.In | ast.NotIn):
        values, options = _operand(left, columns), _literal(right)
        if not isinstance(values, pd.Series) or not isinstance(options, list | tuple):
            raise FilterSyntaxError(f"`in` takes a column and a list: {ast.unparse(left)} in {ast.unparse(right)}")
        hit, present = _per_cell(values, lambda v: v.isin(list(options)))
        return (hit if isinstance(op, ast.In) else ~hit) & present, ~present
    if type(op) not in COMPARE:
        raise FilterSyntaxError(f"unsupported comparison {type(op).__name__}")
    a, b = _operand(left, columns), _operand(right, columns)
    compare = COMPARE[type(op)]
    if isinstance(a, pd.Series) != isinstance(b, pd.Series):  # a column and a value
        column, value = (a, b) if isinstance(a, pd.Series) else (b, a)
        cmp = (lambda v: compare(v, value)) if column is a else (lambda v: compare(value, v))
        true, present = _per_cell(column, cmp)
        return true & present, ~present
    result = compare(_plain(a), _plain(b))
    if not isinstance(result, pd.Series):  # two values
        return np.full(n, bool(result)), np.zeros(n, bool)
    present = a.notna().to_numpy() & b.notna().to_numpy()
    return result.astype("boolean").fillna(False).to_numpy(dtype=bool) & present, ~present


def _per_cell(column: pd.Series, test) -> tuple[np.ndarray, np.ndarray]:
    """(test true, value present) per cell; a categorical is tested once per category, by value."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy()
        per_category = _bool(test(pd.Series(np.asarray(column.cat.categories, dtype=object))))
        return np.append(per_category, False)[codes], codes >= 0  # code -1 (missing) takes the appended False
    return _bool(test(column)), column.notna().to_numpy()


def _bool(result: pd.Series) -> np.ndarray:
    return result.astype("boolean").fillna(False).to_numpy(dtype=bool)


def _plain(values):
    """A categorical column by its values (an unordered one cannot be ordered with < or >)."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        return pd.Series(np.asarray(values.array, dtype=object))
    return values


def _operand(node, columns: dict):
    if isinstance(node, ast.Name):
        if node.id in columns:
            return pd.Series(columns[node.id])
        if node.id in ("true", "false"):  # TileDB accepts them lower-case too
            return node.id == "true"
        raise FilterSyntaxError(f"unknown name {node.id!r}")
    return _literal(node)


def _literal(node):
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr):
        raise FilterSyntaxError(
            f"{ast.unparse(node)!r}: & and | bind tighter than comparisons; put each comparison in parentheses, "
            "or use and / or"
        )
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise FilterSyntaxError(f"{ast.unparse(node)!r} is neither a column nor a value") from None
    return list(value) if isinstance(value, tuple | set) else value


FLIPPED = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
           ast.In: ast.NotIn, ast.NotIn: ast.In}  # fmt: skip


def without_not(expr: str) -> str:
    """`expr` with every `not` pushed into the comparisons it negates (De Morgan; `not x < 2` is `x >= 2`), which
    selects the same rows under three-valued logic: TileDB negates a single comparison only, and `not (a or b)`,
    `not (x in [...])` or `not not a` made tiledbsoma crash the process (SIGSEGV in QueryCondition.negate)."""
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return expr  # TileDB reports it
    return ast.unparse(_push(tree, negate=False))


def _push(node, negate: bool):
    node = _as_boolop(node)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _push(node.operand, not negate)
    if isinstance(node, ast.BoolOp):
        op = node.op if not negate else ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return ast.BoolOp(op=op, values=[_push(v, negate) for v in node.values])
    if not negate:
        return node
    if isinstance(node, ast.Compare) and all(type(op) in FLIPPED for op in node.ops):
        pairs = zip([node.left, *node.comparators], node.ops, node.comparators)  # a < x < b: a < x and x < b
        flipped = [ast.Compare(left=a, ops=[FLIPPED[type(op)]()], comparators=[b]) for a, op, b in pairs]
        return flipped[0] if len(flipped) == 1 else ast.BoolOp(op=ast.Or(), values=flipped)
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return ast.Constant(not node.value)
    if isinstance(node, ast.Name):  # a boolean column
        return ast.Compare(left=node, ops=[ast.Eq()], comparators=[ast.Constant(False)])
    return ast.UnaryOp(op=ast.Not(), operand=node)  # left to TileDB to refuse
