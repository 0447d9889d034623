"""Check that two run folders hold the same numbers: same tables, columns, rows and values.

    python bench/equal_runs.py OLD NEW

A table is a top-level folder holding .parquet files (not ``figures`` nor names starting with ``_`` or
``.``). Each file is read with its hive partition values (``model=NAME``, ``layer=L``, ``shard=S``,
taken from the path as strings) added as columns; rows are sorted by every non-float, non-list column
(float columns break ties) and compared: other columns exactly, floats (also inside list columns)
within relative 1e-9 (absolute 1e-12 near 0; NaN equals NaN, null equals null). In string columns either
run's inputs folder (``<run>-inputs``, as ``bench/fixed_run.py`` makes it) reads ``<inputs>``, so the
corpus table's ``source_file`` paths compare. The sets of figure names under figures/ are compared too.
Exit 0 only if everything is equal.
"""
import argparse
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REL, ABS, SHOW = 1e-9, 1e-12, 3


def tables(run: str) -> dict[str, list[str]]:
    """{table name: sorted .parquet paths under it}."""
    found = {}
    for name in sorted(os.listdir(run)):
        if not name.startswith(("_", ".")) and name != "figures":
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(run, name)) for f in fs if f.endswith(".parquet"))
            found.update({name: files} if files else {})
    return found


def read(run: str, files: list[str], inputs: list[str]) -> pa.Table:
    """Every file of a table, with its hive partition values as string columns (unless the file has them)
    and the ``inputs`` folders in strings as ``<inputs>``."""
    parts = []
    for path in files:
        t = pq.read_table(path)
        for piece in os.path.relpath(os.path.dirname(path), run).split(os.sep)[1:]:
            key, eq, value = piece.partition("=")
            if eq and key not in t.column_names:
                t = t.append_column(key, pa.array([value] * t.num_rows, pa.string()))
        parts.append(t)
    table = pa.concat_tables(parts, promote_options="permissive")
    for i, field in enumerate(table.schema):
        for folder in inputs if pa.types.is_string(field.type) else ():
            table = table.set_column(i, field, pc.replace_substring(table.column(i), folder, "<inputs>"))
    return table


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def floats_equal(a: pa.Array, b: pa.Array) -> tuple[np.ndarray, float]:
    """(per-element equal, max relative diff of values not near 0) under the float rule."""
    na, nb = a.is_null().to_numpy(zero_copy_only=False), b.is_null().to_numpy(zero_copy_only=False)
    x = a.to_numpy(zero_copy_only=False).astype(np.float64)
    y = b.to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff, scale = np.abs(x - y), np.maximum(np.abs(x), np.abs(y))
        ok = (x == y) | (np.isnan(x) & np.isnan(y)) | (diff <= np.maximum(REL * scale, ABS))
        big = np.isfinite(diff) & (scale > ABS)  # the relative diff of values near 0 means nothing
        rel = np.where(big, diff / np.where(big, scale, 1), 0.0)
    ok = np.where(na | nb, na & nb, ok)
    return ok, float(rel.max(initial=0.0))


def column_equal(a: pa.Array, b: pa.Array) -> tuple[np.ndarray, float]:
    """(per-row equal, max relative diff) of one column; list columns elementwise."""
    if is_list(a.type):
        la, lb = pc.list_value_length(a).fill_null(-1), pc.list_value_length(b).fill_null(-1)
        ok = pc.equal(la, lb).to_numpy(zero_copy_only=False)
        if not ok.all():
            return ok, 0.0
        flat_ok, rel = column_equal(pc.list_flatten(a), pc.list_flatten(b))
        rows = np.repeat(np.arange(len(a)), la.to_numpy(zero_copy_only=False).clip(0))
        ok &= np.bincount(rows[~flat_ok], minlength=len(a)) == 0
        return ok, rel
    if pa.types.is_floating(a.type):
        return floats_equal(a, b)
    same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(a.is_null(), b.is_null()))
    return same.to_numpy(zero_copy_only=False), 0.0


def keys_of(table: pa.Table, keys: list[str], i: int) -> str:
    return ", ".join(f"{k}={table.column(k)[i].as_py()!r}" for k in keys)


def short(table: pa.Table, name: str, i: int) -> str:
    text = repr(table.column(name)[i].as_py())
    return text if len(text) < 80 else text[:77] + "..."


def compare(old: pa.Table, new: pa.Table) -> tuple[list[str], float]:
    """(problems, max relative float diff) of two tables."""
    if sorted(old.column_names) != sorted(new.column_names):
        return [f"columns {sorted(old.column_names)} != {sorted(new.column_names)}"], 0.0
    new = new.select(old.column_names)
    problems = [f"type of {f.name}: {f.type} != {g.type}" for f, g in zip(old.schema, new.schema) if f.type != g.type]
    if old.num_rows != new.num_rows:
        return problems + [f"rows {old.num_rows} != {new.num_rows}"], 0.0
    try:  # e.g. int16 -> int32: still compare the values
        new = new.cast(old.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        return problems + [f"cannot cast to the old types: {e}"], 0.0
    floats = [f.name for f in old.schema if pa.types.is_floating(f.type)]
    keys = [f.name for f in old.schema if f.name not in floats and not is_list(f.type)]
    old, new = (t.sort_by([(n, "ascending") for n in keys + floats]) for t in (old, new))
    max_rel = 0.0
    for name in old.column_names:
        ok, rel = column_equal(old.column(name).combine_chunks(), new.column(name).combine_chunks())
        max_rel = max(max_rel, rel)
        bad = np.flatnonzero(~ok)
        if len(bad):
            shown = "; ".join(f"({keys_of(old, keys, i)}): {short(old, name, i)} != {short(new, name, i)}" for i in bad[:SHOW])
            problems.append(f"{name}: {len(bad)} rows differ, e.g. {shown}")
    return problems, max_rel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="run folder (local path)")
    p.add_argument("new", help="run folder (local path)")
    args = p.parse_args(argv)
    a, b = tables(args.old), tables(args.new)
    inputs = [os.path.abspath(run) + "-inputs" for run in (args.old, args.new)]
    differ = 0
    for name in sorted(set(a) | set(b)):
        if name in a and name in b:
            old = read(args.old, a[name], inputs)
            problems, max_rel = compare(old, read(args.new, b[name], inputs))
        else:
            problems, max_rel = [f"only in {args.old if name in a else args.new}"], 0.0
        note = f" (max relative float diff {max_rel:.3g})" if max_rel else ""
        print(f"{name}: DIFFERENT: {' | '.join(problems)}{note}" if problems else f"{name}: equal ({old.num_rows} rows){note}")
        differ += bool(problems)
    figs = [set(os.listdir(f)) if os.path.isdir(f := os.path.join(r, "figures")) else set() for r in (args.old, args.new)]
    if figs[0] != figs[1]:
        print(f"figures: DIFFERENT: only in old {sorted(figs[0] - figs[1])}, only in new {sorted(figs[1] - figs[0])}")
    else:
        print(f"figures: same {len(figs[0])} names")
    n = len(set(a) | set(b))
    summary = f"all {n} tables equal" if not differ else f"{differ} of {n} tables differ"
    print(summary + ("" if figs[0] == figs[1] else "; figures differ"))
    return 0 if not differ and figs[0] == figs[1] else 1


if __name__ == "__main__":
    sys.exit(main())
