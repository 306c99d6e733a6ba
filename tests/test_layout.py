"""The house plan of DESIGN.md, checked against the code: which file imports which (arrows point one way; the
training scripts do not import each other; evaluate.py imports no training script; no import hides inside a
function), every top-level file has a place in the plan, and every file reads in one sitting.

Run: python -m pytest -q tests/test_layout.py
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# file -> the project modules it may import at module level (DESIGN.md, "Files and who may import whom")
ALLOWED = {
    "shapes": set(),
    "data": {"shapes"},
    "convert": {"data"},
    "vae": set(),
    "msf": {"vae"},
    "encoders": set(),
    "slot_attention": set(),
    "decoders": set(),
    "figures": {"data"},
    "ocl": {"msf", "encoders", "slot_attention", "decoders"},
    "train_common": {"data"},
    "checkpoints": {"data", "train_common"},
    "train_vae": {"data", "vae", "msf", "checkpoints", "train_common", "evaluate", "figures"},
    "train_ocl": {"data", "msf", "ocl", "checkpoints", "train_common", "evaluate", "figures"},
    "evaluate": {"data", "msf", "ocl", "checkpoints", "train_common", "figures"},
}
LONGEST = 620  # lines: a file reads in one sitting (DESIGN.md: ~600); convert.py, off the reading path, is the exception


def project_imports(path):
    """(module-level imports, {function name: imports inside it}) of one file, project modules only."""
    tree = ast.parse(path.read_text())
    top, inner = set(), {}

    def names(node):
        if isinstance(node, ast.Import):
            return {a.name.split(".")[0] for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            return {node.module.split(".")[0]}
        return set()
    for node in tree.body:
        top |= names(node)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found = set().union(*(names(n) for n in ast.walk(node)))
            if found & set(ALLOWED):
                inner[node.name] = found & set(ALLOWED)
    return top & set(ALLOWED), inner


def test_every_top_level_file_is_in_the_plan():
    assert {p.stem for p in ROOT.glob("*.py")} == set(ALLOWED)


def test_imports_follow_the_plan():
    for name, allowed in ALLOWED.items():
        top, inner = project_imports(ROOT / f"{name}.py")
        assert top <= allowed, f"{name}.py imports {sorted(top - allowed)}, which DESIGN.md does not allow"
        for function, found in inner.items():
            assert not found, f"{name}.{function} imports {sorted(found)} inside: imports go at the top of the file"


def test_the_plan_has_no_cycle_and_no_script_imports_another():
    assert "train_vae" not in ALLOWED["train_ocl"] and "train_ocl" not in ALLOWED["train_vae"]
    state = {}

    def visit(n):  # depth-first search; meeting a module that is still open is a cycle
        assert state.get(n) != "open", f"import cycle through {n}"
        if state.get(n) != "done":
            state[n] = "open"
            for m in ALLOWED[n]:
                visit(m)
            state[n] = "done"
    for n in ALLOWED:
        visit(n)


def test_every_file_reads_in_one_sitting():
    for path in ROOT.glob("*.py"):
        lines = len(path.read_text().splitlines())
        if path.name == "convert.py":  # it says so in its first lines
            assert "off the reading path" in path.read_text()[:1000]
            continue
        assert lines <= LONGEST, f"{path.name} has {lines} lines (at most {LONGEST})"


def enclosing(tree, line):
    """The dotted name of the innermost class or function holding `line` (Class.method), or at module level the name
    the statement assigns (RECIPES, SIZES, ...)."""
    def walk(body, prefix):
        for node in body:
            end = getattr(node, "end_lineno", node.lineno)
            if node.lineno <= line <= end:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    return walk(node.body, prefix + [node.name]) or ".".join(prefix + [node.name])
                if not prefix and isinstance(node, (ast.Assign, ast.AnnAssign)):
                    target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                    return getattr(target, "id", None)
                return ".".join(prefix) or None
        return None
    return walk(tree.body, [])


def differences_table():
    """The README's differences table: one dict per row with its `ours` cell and its citations [(file, name)]."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Differences from the paper", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what ")]
    header = next(line for line in section.splitlines() if line.startswith("| what "))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.replace("\\|", "/").strip("|").split("|")]
        assert len(cells) == len(columns), f"a differences row with {len(cells)} cells: {line[:80]}"
        row = dict(zip(columns, cells))
        cited, current = [], None
        for item in row["file"].replace(";", ",").split(","):
            item = item.strip().strip("`")
            if not item:
                continue
            if ":" in item:
                current, item = item.split(":", 1)
            cited.append((current, item))
        rows.append({"what": row["what"], "ours": row["ours"], "cited": cited})
    return rows


def test_differences_table_and_code_tags_name_the_same_departures():
    """Every `# ours:` / `# authors:` tag in the code lies in a function, class or table the README's differences
    table cites; every row whose `ours` is not the paper's has a tag where it points; every citation exists."""
    rows = differences_table()
    assert len(rows) >= 30
    tags = []  # (file, enclosing name, line)
    trees = {}
    for path in sorted(ROOT.glob("*.py")):
        source = path.read_text()
        trees[path.name] = ast.parse(source)
        for i, line in enumerate(source.splitlines(), 1):
            if "# ours:" in line or "# authors:" in line:
                tags.append((path.name, enclosing(trees[path.name], i) or "", i))
    defined = {f: {enclosing(t, n.lineno) for n in ast.walk(t) if hasattr(n, "lineno")} for f, t in trees.items()}
    covers = lambda cite, tag: cite[0] == tag[0] and (tag[1] == cite[1] or tag[1].startswith(cite[1] + "."))  # noqa
    for row in rows:
        for f, name in row["cited"]:
            assert f in trees, f"row '{row['what']}' cites {f}, which is not a file of the project"
            assert any(d == name or (d or "").startswith(name + ".") for d in defined[f]), \
                f"row '{row['what']}' cites {f}:{name}, which {f} does not define"
    for tag in tags:
        assert any(covers(c, tag) for row in rows for c in row["cited"]), \
            f"{tag[0]}:{tag[2]} (in {tag[1] or 'module level'}) carries a tag no row of the differences table cites"
    for row in rows:
        if not row["ours"].startswith("the paper's"):
            assert any(covers(c, tag) for c in row["cited"] for tag in tags), \
                f"row '{row['what']}' is a departure, but no line where it points carries a # ours: / # authors: tag"
