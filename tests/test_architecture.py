"""The shape of the code, checked from its syntax trees (issue 14, item 4).

* Imports between the project's own modules are at module level, where a reader sees them,
  with one justified exception; a function-level import is for a heavy or optional
  third-party package only, and each such package is named here with the reason.
* No module imports another module's private (`_name`) name.
* No import cycle between the project's modules.
* Each engine module says what is public (`__all__`); every other top-level name is private
  by name. `blackbox_zo` exports the public API lazily: `import blackbox_zo` and the CLI's
  parser import no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blackbox_zo", "oracles", "problems")

# Function-level imports of project modules that are allowed, each with its reason.
ALLOWED_PROJECT_IMPORTS = {
    # the commands import the engine (torch, seconds); parsing a command line and --help must not
    ("blackbox_zo/cli.py", "blackbox_zo._commands"),
}
# Third-party packages that may be imported inside a function: optional extras (not installed
# by default) and heavy packages only some commands need (import times measured on the 2-core VM).
ALLOWED_LAZY_PACKAGES = {
    "phi": "optional extra `sim` (PhiFlow)",
    "gymnasium": "optional extra `gym`",
    "onnxruntime": "optional extra `onnx`",
    "onnx": "optional extra `onnx`",
    "onnxscript": "optional extra `onnx`",
    "matplotlib": "plots only (~1 s to import)",
    "scipy": "statistics of the certification and pruning studies (seconds to import)",
    "sklearn": "the digits data set (seconds to import): only a run that reads it pays",
    "tensorboard": "optional extra `tensorboard` (run.loggers)",
    "torch.utils.tensorboard": "needs the optional extra `tensorboard` (run.loggers)",
    "mlflow": "optional extra `mlflow` (run.loggers; ~5 s to import)",
}


def project_files(*roots: str) -> list[Path]:
    return sorted(p for r in roots for p in (ROOT / r).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an ImportFrom names, with relative imports resolved against `path`."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class Imports(ast.NodeVisitor):
    """Every import of a file: (line, module, imported names, inside a function?)."""

    def __init__(self, path: Path):
        self.path, self.depth, self.found = path, 0, []

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        if self.depth == 0 and is_type_checking(node):
            return  # imports a type checker sees; nothing runs them
        self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((node.lineno, alias.name, [], self.depth > 0))

    def visit_ImportFrom(self, node):
        module = absolute(node, self.path)
        names = [a.name for a in node.names]
        # `from package import submodule` imports the submodule
        self.found.append((node.lineno, module, names, self.depth > 0))


def imports_of(path: Path):
    visitor = Imports(path)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def test_function_level_imports_are_only_for_optional_or_heavy_packages():
    bad = []
    for path in project_files(*PACKAGES):
        rel = str(path.relative_to(ROOT))
        for line, module, names, in_function in imports_of(path):
            if not in_function:
                continue
            if is_project(module):
                targets = [module] + [f"{module}.{n}" for n in names]
                if not any((rel, t) in ALLOWED_PROJECT_IMPORTS for t in targets):
                    bad.append(f"{rel}:{line}: import of {module} {names or ''} inside a function")
            elif not any(module == k or module.startswith(k + ".") for k in ALLOWED_LAZY_PACKAGES):
                bad.append(f"{rel}:{line}: import of {module} inside a function (not an optional or heavy package)")
    assert not bad, "\n".join(bad)


def test_the_scan_sees_a_function_level_import(tmp_path):
    path = ROOT / "blackbox_zo" / "_scan_probe.py"  # never written: parsed from a string
    tree = ast.parse("import os\n\ndef f():\n    from .trainer import train\n    import json\n")
    visitor = Imports(path)
    visitor.visit(tree)
    assert visitor.found == [(1, "os", [], False), (4, "blackbox_zo.trainer", ["train"], True), (5, "json", [], True)]


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in project_files(*PACKAGES, "benchmarks", "tests"):
        rel = str(path.relative_to(ROOT))
        own = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        module_aliases: dict[str, str] = {}  # local name -> project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = absolute(node, path)
                if not is_project(module):
                    continue
                for alias in node.names:
                    submodule = (ROOT / Path(*module.split("."), alias.name)).with_suffix(".py").exists() or \
                        (ROOT / Path(*module.split("."), alias.name) / "__init__.py").exists()
                    # a package's private module is there for the package's own modules
                    own_private_module = submodule and own.split(".")[0] == module.split(".")[0]
                    if alias.name.startswith("_") and not alias.name.startswith("__") and module != own \
                            and not own_private_module:
                        bad.append(f"{rel}:{node.lineno}: from {module} import {alias.name}")
                    if submodule:
                        module_aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if is_project(alias.name):
                        module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        if rel.startswith("tests/"):
            continue  # tests may look inside an object they built (white-box); they import no private name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr} ({module_aliases[node.value.id]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_project_modules():
    modules = {module_name(p): p for p in project_files(*PACKAGES)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for _, module, names, in_function in imports_of(path):
            if in_function or not is_project(module):
                continue
            for target in [f"{module}.{n}" for n in names] + [module]:
                if target in modules and target != name:
                    graph[name].add(target)
                    break
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how packages work, not a cycle of two modules
            if state.get(nxt) == "open" and not (nxt.startswith(node + ".") or node.startswith(nxt + ".")):
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def public_top_level(tree: ast.Module) -> tuple[list[str] | None, list[str]]:
    declared, defined = None, []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                declared = list(ast.literal_eval(node.value))
            except ValueError:  # computed (blackbox_zo/__init__.py: the lazily exported names)
                declared = []
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            defined.append(node.name)
    return declared, defined


@pytest.mark.parametrize("path", project_files("blackbox_zo"), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_engine_module_says_what_is_public(path):
    declared, defined = public_top_level(ast.parse(path.read_text()))
    if path.name in ("__main__.py",) or (path.name == "__init__.py" and path.parent.name == "contrib"):
        return
    assert declared is not None, f"{path.name} has no __all__"
    missing = sorted(set(defined) - set(declared))
    assert not missing, f"{path.name}: public names not in __all__ (make them private by name): {missing}"


def test_the_package_exports_the_public_api_lazily():
    import blackbox_zo

    for name in blackbox_zo.__all__:
        assert getattr(blackbox_zo, name) is not None, name
    assert blackbox_zo.CGE is __import__("blackbox_zo.estimators", fromlist=["CGE"]).CGE
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        blackbox_zo.nope  # noqa: B018
    code = ("import sys, blackbox_zo, blackbox_zo.cli; blackbox_zo.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", "import blackbox_zo / the CLI's parser imported " + out.stdout


def test_the_docs_import_from_the_package():
    """The README and docs/ show the public API: `from blackbox_zo import ...`, not from its modules
    (contrib, a separate research package, is imported by its own path)."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [(p.name, m) for p in pages for m in re.findall(r"^\s*from (blackbox_zo\.[\w.]+) import", p.read_text(), re.M)
             if not m.startswith("blackbox_zo.contrib")]
    assert not found, found
