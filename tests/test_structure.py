"""The house rule that keeps one analysis in one place: no module outside an analysis's own module or
folder names it."""
import ast
import io
import pathlib
import tokenize

from jobs import analyses

ROOT = pathlib.Path(__file__).resolve().parent.parent


def own_place(path: pathlib.Path, name: str) -> bool:
    rel = path.relative_to(ROOT / "jobs" / "analyses") if (ROOT / "jobs" / "analyses") in path.parents else None
    return rel is not None and (rel.parts[0] == name or rel.parts[0] == f"{name}.py")


def string_literals(path: pathlib.Path):
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):  # f-strings
                continue
            yield tok.start[0], value


def test_no_module_names_an_analysis_outside_its_place():
    names = set(analyses.names())
    found = [f"{p.relative_to(ROOT)}:{line} {value!r}"
             for folder in ("jobs", "probe_core") for p in sorted((ROOT / folder).rglob("*.py"))
             for line, value in string_literals(p)
             if value in names and not own_place(p, value)]
    assert not found, "analysis names outside their own place:\n" + "\n".join(found)


def test_the_check_finds_a_name(tmp_path):
    """The literal scan sees a name where one is written (so the test above can fail)."""
    f = tmp_path / "x.py"
    f.write_text('if "rotation" in cfg.analyses:\n    pass\n')
    assert [v for _, v in string_literals(f)] == ["rotation"]
