"""The package's architecture rules, read off its source (docs/concepts.md, "Architecture").

- no import cycle between its modules, counting imports inside functions (type-only imports under
  `if TYPE_CHECKING:` are not run, so they do not count);
- no private name (`_x`) imported from another module;
- the library (`layers/`, `core/`, `training/`, `hub/`, `config`, `validation`) never imports the application
  modules (`pipeline`, `tasks`, `data`, `evaluation`, `report`, `cli`);
- no `isinstance` / `type(...) is` test on a concrete factored-layer class outside the module defining it: other
  code talks to the `FactoredLayer` protocol;
- no function longer than 50 lines of code (docstring excluded);
- `import hf_svd_compress.report` (and the package, and the CLI module) loads neither torch nor transformers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_svd_compress"
APPLICATION = {"pipeline", "tasks", "data", "evaluation", "report", "cli"}
MAX_LINES = 50


@cache
def modules() -> dict[str, ast.Module]:
    """`{dotted name: parsed source}` of the package, without the remote-code template and vendored metrics."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "templates" in parts or "metric_modules" in parts:
            continue
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(path.read_text())
    return found


def runtime_nodes(tree: ast.Module):
    """Every node of `tree` except those under `if TYPE_CHECKING:`."""
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for child in ast.walk(node)
    }
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def imports(name: str) -> list[tuple[str, str]]:
    """`(module, imported name)` pairs of the package's own imports in module `name` (absolute or relative)."""
    is_package = name == "hf_svd_compress" or (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
    pairs = []
    for node in runtime_nodes(modules()[name]):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "hf_svd_compress":
                pairs += [(base, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs += [(alias.name, "") for alias in node.names if alias.name.startswith("hf_svd_compress.")]
    return pairs


def edges() -> dict[str, set[str]]:
    """The import graph: a module imports `pkg.mod` for `from pkg import mod`, else the module it names."""
    graph = {}
    for name in modules():
        targets = set()
        for module, imported in imports(name):
            targets.add(f"{module}.{imported}" if f"{module}.{imported}" in modules() else module)
        graph[name] = {t for t in targets if t in modules() and t != name}
    return graph


def test_no_import_cycles():
    graph, cycles = edges(), []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)
    assert not cycles, cycles[:3]


def test_no_private_names_imported_across_modules():
    private = [
        f"{name} imports {imported} from {module}"
        for name in modules()
        for module, imported in imports(name)
        if imported.startswith("_") and module != name
    ]
    assert not private, private


def test_the_library_never_imports_the_application():
    application = {f"hf_svd_compress.{name}" for name in APPLICATION}
    wrong = [
        f"{name} imports {target}"
        for name, targets in edges().items()
        if name not in application and name != "hf_svd_compress"
        for target in targets & application
    ]
    assert not wrong, wrong


def concrete_layer_classes() -> dict[str, str]:
    """`{class name: defining module}` of the factored layers and the exported two-factor classes."""
    import hf_svd_compress.layers  # noqa: F401  (registers the built-in layers)
    from hf_svd_compress.layers.base import FactoredLayer

    defined = {name: cls.__module__ for name, cls in FactoredLayer.classes.items()}
    defined = {n: m for n, m in defined.items() if m.startswith("hf_svd_compress.")}
    template = "hf_svd_compress.hub.templates.modeling_svd_compressed"
    return {**defined, "LowRankLinear": template, "LowRankConv2d": template, "CUR_TYPES": "hf_svd_compress.layers.cur"}


def type_tests(tree: ast.Module) -> list[tuple[int, str]]:
    """`(line, class name)` of every `isinstance(x, C)` / `type(x) is C` in `tree` (tuples of classes included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2:
            tested = node.args[1]
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):
            tested = node.comparators[0]
        else:
            continue
        names = tested.elts if isinstance(tested, ast.Tuple) else [tested]
        found += [(node.lineno, n.id) for n in names if isinstance(n, ast.Name)]
        found += [(node.lineno, n.value.id) for n in names if isinstance(n, ast.Starred) and hasattr(n.value, "id")]
    return found


def test_no_isinstance_on_concrete_layer_classes_outside_their_module():
    classes = concrete_layer_classes()
    wrong = [
        f"{name}:{line} tests {cls}"
        for name, tree in modules().items()
        for line, cls in type_tests(tree)
        if cls in classes and classes[cls] != name
    ]
    assert not wrong, wrong


def test_no_function_over_fifty_lines():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_LINES:
                    long.append(f"{name}.{node.name}: {body[-1].end_lineno - body[0].lineno + 1} lines")
    assert not long, long


@pytest.mark.parametrize("module", ["hf_svd_compress.report", "hf_svd_compress", "hf_svd_compress.cli"])
def test_light_imports_load_neither_torch_nor_transformers(module):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    )
    loaded = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("torch", "transformers") or ".training" in m)
    assert not heavy, heavy[:10]
