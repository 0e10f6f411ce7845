"""The package's import structure (issue 11), read from the source with ``ast`` (nothing imported).

The data flow is data -> model -> unlearn -> compress/attack -> evaluate -> report; imports point down
that chain (cli -> pipeline -> stages -> components), never back up. Every import counts, module-level
and function-level (late) ones alike:

- no import cycle among robust_unlearn modules;
- no private name (leading underscore) imported from another robust_unlearn module;
- only the CLI imports ``robust_unlearn.pipeline`` (the orchestrator).

An edge ``a -> b``: module ``a`` names module ``b`` in an import. ``from pkg import x`` is an edge to
``pkg.x`` when ``x`` is a submodule, else to the package ``pkg`` (its ``__init__``). ``kernels/``
installs as ``robust_unlearn.kernels`` (pyproject's package-dir).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = "robust_unlearn"
SOURCES = {TOP: ROOT / "robust_unlearn", f"{TOP}.kernels": ROOT / "kernels"}
PIPELINE_USERS = {f"{TOP}.cli", f"{TOP}.__main__"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__)."""
    out = {}
    for pkg, base in SOURCES.items():
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = (f, is_pkg)
    return out


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` written in ``mod``."""
    if level == 0:
        return name or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(modules: dict[str, tuple[Path, bool]]) -> list[tuple[str, str, str | None, int]]:
    """Every (importer, imported module, imported name or None, line) among robust_unlearn modules."""
    found = []
    for mod, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):  # module level and inside functions/classes alike
            if isinstance(node, ast.Import):
                for a in node.names:
                    name = a.name
                    while name and name not in modules:  # `import a.b.c`: the deepest known module
                        name = name.rpartition(".")[0]
                    if name:
                        found.append((mod, name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node.level, node.module)
                if target not in modules:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:  # `from pkg import submodule`
                        found.append((mod, sub, None, node.lineno))
                    else:
                        found.append((mod, target, a.name, node.lineno))
    return found


MODULES = _modules()
IMPORTS = _imports(MODULES)


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _ in IMPORTS:
        if a != b:
            g[a].add(b)
    return g


def _find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``g`` as [m0, m1, ..., m0], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(g):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(g[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(g[nxt]))))
                path.append(nxt)
    return None


def test_sources_found():
    assert f"{TOP}.pipeline" in MODULES and f"{TOP}.cli" in MODULES and f"{TOP}.kernels.quant_floor" in MODULES
    assert any(b == f"{TOP}.pipeline" for _, b, _, _ in IMPORTS)  # the graph sees late imports (cli's)


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_across_modules():
    bad = [f"{MODULES[a][0].relative_to(ROOT)}:{line}: {name} from {b}"
           for a, b, name, line in IMPORTS if name and name.startswith("_") and not name.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_only_cli_imports_pipeline():
    bad = [f"{MODULES[a][0].relative_to(ROOT)}:{line}" for a, b, _, line in IMPORTS
           if b == f"{TOP}.pipeline" and a not in PIPELINE_USERS]
    assert not bad, "robust_unlearn.pipeline imported outside the CLI:\n" + "\n".join(bad)


def test_cycle_finder():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert _resolve("robust_unlearn.data.tofu", False, 2, "errors") == "robust_unlearn.errors"
    assert _resolve("robust_unlearn.data", True, 1, "tofu") == "robust_unlearn.data.tofu"
    assert _resolve("robust_unlearn.compress.prune", False, 1, None) == "robust_unlearn.compress"


# the data flow's lower layers never import the upper ones (issue 11)
LOWER = {f"{TOP}.data": (f"{TOP}.data", f"{TOP}.errors"),  # the benchmarks' declarations and loaders
         f"{TOP}.unlearn": None, f"{TOP}.robust": None}  # unlearning: nothing of the metrics


def _under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_lower_layers_do_not_import_upper_ones():
    bad = []
    for a, b, _, line in IMPORTS:
        for pkg, allowed in LOWER.items():
            if not _under(a, pkg):
                continue
            if allowed is not None and not any(_under(b, x) for x in allowed):
                bad.append(f"{MODULES[a][0].relative_to(ROOT)}:{line}: {b}")
            if allowed is None and _under(b, f"{TOP}.metrics"):
                bad.append(f"{MODULES[a][0].relative_to(ROOT)}:{line}: {b}")
    assert not bad, "imports pointing up the data flow:\n" + "\n".join(bad)
