"""Benchmark-only: make annbatch 0.3.1 (Requires-Python >= 3.12) importable on Python 3.11.
Syntax-only backport (PEP 695 generics, `type` aliases, itertools.batched); loading logic untouched.
Usage: pip install --no-deps --ignore-requires-python annbatch==0.3.1 && python bench/annbatch_py311.py SITE_PACKAGES"""

import pathlib
import re
import sys

sp = pathlib.Path(sys.argv[1]) / "annbatch"


def sub(path, old, new, regex=False):
    p = sp / path
    s = p.read_text()
    s2 = re.sub(old, new, s, count=1, flags=re.M | re.S) if regex else s.replace(old, new, 1)
    assert s2 != s, (path, old)
    p.write_text(s2)


sub(
    "types.py",
    "from typing import NotRequired, TypedDict",
    "from typing import NotRequired, TypedDict\n\n\nclass _TypeAlias:\n    def __init__(self, v):\n        self.__value__ = v\n",
)
for name in ["BackingArray_T", "InputInMemoryArray_T", "OutputInMemoryArray_T"]:
    sub("types.py", rf"^type {name} = ([^\n]*)$", rf"{name} = _TypeAlias(\1)", regex=True)
sub(
    "types.py",
    "class LoaderOutput[OutputInMemoryArray: OutputInMemoryArray_T](TypedDict):",
    "class LoaderOutput(TypedDict):",
)
sub(
    "loader.py",
    r"class Loader\[\s*BackingArray: BackingArray_T,\s*OutputInMemoryArray: OutputInMemoryArray_T,\s*\]\(IterableDataset\):",
    "class Loader(IterableDataset):",
    regex=True,
)
for fn in [
    "_default_load_adata",
    "_validate_anndatas_and_maybe_get_bytes_per_row",
    "_validate_groupby_columns",
    "_lazy_load_adata",
]:
    sub("io.py", f"def {fn}[T: zarr.Group | h5py.Group | PathLike[str] | str](", f"def {fn}(")
for f in ["samplers/_class_samplers/_class_sampler.py", "samplers/_class_samplers/_weighted_class_sampler.py"]:
    p = sp / f
    s = p.read_text().replace("itertools.batched(", "_batched(")
    s = s.replace(
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nimport itertools as _it\n\n\ndef _batched(it, n):\n    it = iter(it)\n    while b := tuple(_it.islice(it, n)):\n        yield b\n",
        1,
    )
    p.write_text(s)
import compileall

assert compileall.compile_dir(str(sp), quiet=1, force=True)
print("patched OK")
