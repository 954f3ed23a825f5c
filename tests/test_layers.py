"""The architecture of DESIGN.md, enforced: imports point down the layers only, third-party
libraries stay in the one place that owns them, and no two modules import each other.

Every ``import`` and ``from ... import`` of every module under skillhub/ counts, inside
functions too (a lazy import is still a dependency); only imports guarded by
``if TYPE_CHECKING:`` are left out of the cycle check, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "skillhub"

# Longest prefix wins. A new module must be placed here before it can be imported anywhere.
LAYERS = {
    "skillhub": 0, "skillhub._lazy": 0, "skillhub.errors": 0, "skillhub.config": 0, "skillhub.progress": 0,
    "skillhub.io": 1, "skillhub.numerics": 1,
    "skillhub.operators": 2,
    "skillhub.pack": 3,
    "skillhub.compress": 4, "skillhub.activation": 4, "skillhub.scoring": 4,
    "skillhub.registry": 5,
    "skillhub.sharing": 6, "skillhub.routing": 6, "skillhub.graft": 6, "skillhub.evaluation": 6,
    "skillhub.serving": 7, "skillhub.demo": 7, "skillhub.cli": 7, "skillhub.testing": 7, "skillhub.__main__": 7,
}
# Third-party packages and the only modules (or packages) that may import them.
OWNERS = {
    "huggingface_hub": ("skillhub.io.hub",),
    "httpx2": ("skillhub.io.hub",),
    "sqlalchemy": ("skillhub.registry",),
    "sqlmodel": ("skillhub.registry",),
    "click": ("skillhub.cli",),
    "rich": ("skillhub.cli",),
    "peft": ("skillhub.activation", "skillhub.sharing.peft_export"),
    "sklearn": ("skillhub.routing.training",),
    "trl": ("skillhub.graft.training",),
    "ray": ("skillhub.compress.ray_executor",),
    "datasets": ("skillhub.graft.training",),
    "lm_eval": ("skillhub.scoring.harness",),
    "fastapi": ("skillhub.serving",),
    "starlette": ("skillhub.serving",),
    "uvicorn": ("skillhub.serving.server",),
    "prometheus_client": ("skillhub.serving.metrics",),
    "pydantic": ("skillhub.serving.protocol",),
    "jinja2": ("skillhub.serving.browser",),
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"{module} has no layer in tests/test_layers.py LAYERS: place it before importing it")


def _within(module: str, owner: str) -> bool:
    return module == owner or module.startswith(owner + ".")


def imports(module: str, source: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, only for type checking) for every import in ``source``."""
    tree = ast.parse(source)
    guarded = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    package = module if source and module.endswith("__init__") else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in guarded) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno, id(node) in guarded))
            if base.split(".")[0] == "skillhub":  # `from skillhub.io import hub`: names may be submodules
                folder = PACKAGE.parent.joinpath(*base.split("."))
                found += [(f"{base}.{alias.name}", node.lineno, id(node) in guarded) for alias in node.names
                          if (folder / f"{alias.name}.py").exists() or (folder / alias.name).is_dir()]
    return found


def violations(module: str, source: str) -> list[str]:
    """What is wrong with the imports of ``module`` (dotted name) whose code is ``source``."""
    problems = []
    own = layer_of(module)
    for target, line, _ in imports(module, source):
        root = target.split(".")[0]
        if root == "skillhub":
            if layer_of(target) > own:
                problems.append(f"{module}:{line} imports {target} (layer {layer_of(target)}) from layer {own}")
        elif root in OWNERS and not any(_within(module, owner) for owner in OWNERS[root]):
            problems.append(f"{module}:{line} imports {root}, which only {', '.join(OWNERS[root])} may import")
    return problems


def modules() -> dict[str, str]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if "_registry" in relative.parts:  # the migrations, shipped as data
            continue
        name = ".".join(relative.parts).removesuffix(".__init__")
        found[name] = path.read_text(encoding="utf-8")
    return found


def test_every_module_imports_down_the_layers_only() -> None:
    problems = [problem for name, source in modules().items() for problem in violations(name, source)]
    assert not problems, "\n".join(problems)


def test_one_layer_per_folder() -> None:
    """Every module of a folder sits at the folder's layer: a folder holding two layers would let
    imports climb back up inside it (issue 27)."""
    mixed = [f"{name} (layer {layer_of(name)}) in {name.split('.')[1]}/ (layer {layer_of('.'.join(name.split('.')[:2]))})"
             for name in modules() if name.count(".") >= 2 and layer_of(name) != layer_of(".".join(name.split(".")[:2]))]
    assert not mixed, "\n".join(mixed)
    overrides = [key for key in LAYERS if key.count(".") >= 2]
    assert not overrides, f"LAYERS places modules apart from their folder: {overrides}"


def test_no_module_over_450_lines_and_at_most_8_files_at_the_top() -> None:
    long = [f"{path.relative_to(PACKAGE.parent)}: {count} lines" for path in sorted(PACKAGE.rglob("*.py"))
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > 450]
    assert not long, "\n".join(long)
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, f"{len(top)} files at the top of skillhub/: {top}"


def import_graph() -> dict[str, set[str]]:
    """skillhub module -> the skillhub modules it imports (type-checking-only imports left out)."""
    graph: dict[str, set[str]] = {}
    known = modules()
    for name, source in known.items():
        graph[name] = set()
        for target, _, type_only in imports(name, source):
            if type_only:
                continue
            while target and target not in known:  # a name imported from a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "\n".join(cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("module,source,expected", [
    ("skillhub.io.tensorfile", "from skillhub.registry import Registry\n", "imports skillhub.registry (layer 5) from layer 1"),
    ("skillhub.pack.format", "def f():\n    import skillhub.compress.pipeline\n", "(layer 4) from layer 3"),
    ("skillhub.operators.protocol", "from skillhub import activation\n", "imports skillhub.activation"),
    ("skillhub.registry.front", "import click\n", "imports click, which only skillhub.cli may import"),
    ("skillhub.sharing.pull", "from huggingface_hub import HfApi\n", "only skillhub.io.hub may import"),
    ("skillhub.scoring.scores", "import sqlalchemy\n", "only skillhub.registry may import"),
    ("skillhub.compress.pipeline", "from rich.console import Console\n", "only skillhub.cli may import"),
    ("skillhub.scoring.metrics", "from skillhub.evaluation.forgetting import x\n", "(layer 6) from layer 4"),
    ("skillhub.registry.front", "from skillhub.evaluation.forgetting import add_and_score\n", "(layer 6) from layer 5"),
])
def test_the_guard_catches_what_it_should(module: str, source: str, expected: str) -> None:
    problems = violations(module, source)
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_guard_accepts_downward_and_owned_imports() -> None:
    assert violations("skillhub.registry.front", "import sqlalchemy\nfrom skillhub.pack import load_pack\n") == []
    assert violations("skillhub.cli.main", "import click\nfrom skillhub.registry import Registry\n") == []
    assert violations("skillhub.io.hub", "import huggingface_hub\nfrom skillhub import config\n") == []


def test_a_module_without_a_layer_is_reported() -> None:
    with pytest.raises(KeyError, match="has no layer"):
        violations("elsewhere.module", "")
