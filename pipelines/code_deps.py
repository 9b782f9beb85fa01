"""The code a stage runs: every ``pipelines/`` file its module imports, found from the source.

A stage's DVC code dependencies are its module plus the transitive closure of what it
imports inside ``pipelines/``, read with :mod:`ast` (nothing is imported or executed):

- ``import pipelines.x.y`` and ``from pipelines.x import y`` (absolute or relative), at
  module level or inside functions, since a lazy import runs as much as an eager one;
- the ``__init__.py`` of every package on the way, which Python runs on import;
- files a module addresses from its own location, ``Path(__file__).parent / "app"``: the
  Flower apps that ``flwr run`` ships are code the stage runs without importing it;
- a module named whole in a string, as in ``[python, "-m", "pipelines.x.y"]``: a process
  the stage starts runs it;
- not imports under ``if TYPE_CHECKING:``, which never run.

Imports outside ``pipelines/`` (torch, mlflow, ...) are pinned by the lock files, not
tracked here. Only the standard library is used: the DVC render and its drift test call it.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "pipelines"
PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_SUFFIXES = (".py", ".toml")


def module_file(dotted: str, root: Path = PACKAGE_DIR.parent) -> Path | None:
    """The file of module ``dotted`` under ``root`` (``pkg/__init__.py`` for a package)."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dotted_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imported_names(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """Dotted names an import statement may load: modules and ``from`` targets."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        parts = package.split(".")
        base_parts = parts[: len(parts) - node.level + 1]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def _path_from_file(node: ast.expr, file: Path) -> Path | None:
    """Evaluate ``Path(__file__)[.resolve()][.parent...] / "a" / "b"``, else None."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id == "Path" and len(node.args) == 1:
            arg = node.args[0]
            return file if isinstance(arg, ast.Name) and arg.id == "__file__" else None
        if isinstance(func, ast.Attribute) and func.attr in ("resolve", "absolute"):
            return _path_from_file(func.value, file)
        return None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _path_from_file(node.value, file)
        return inner.parent if inner is not None else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        inner = _path_from_file(node.left, file)
        right = node.right
        if inner is not None and isinstance(right, ast.Constant) and isinstance(right.value, str):
            return inner / right.value
    return None


def _shipped_files(path: Path) -> list[Path]:
    """The code files at ``path``: the file itself, or a folder's .py and .toml files."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in SHIPPED_SUFFIXES and "__pycache__" not in p.parts
        )
    return []


@cache
def direct_dependencies(file: Path, root: Path = PACKAGE_DIR.parent) -> tuple[Path, ...]:
    """Files under ``root/pipelines`` that ``file`` imports or addresses, one step deep."""
    tree = ast.parse(file.read_text(), filename=str(file))
    in_package = file.is_relative_to(root / PACKAGE)
    package = _dotted_name(file, root) if in_package else ""
    if in_package and file.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[Path] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for dotted in _imported_names(node, package):
                if dotted == PACKAGE or dotted.startswith(PACKAGE + "."):
                    found.update(_package_chain(dotted, root))
        elif isinstance(node, ast.BinOp):
            target = _path_from_file(node, file)
            if target is not None and target.is_relative_to(root / PACKAGE):
                found.update(_shipped_files(target))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(PACKAGE + ".")
            and node.value.replace(".", "").replace("_", "").isalnum()
            and module_file(node.value, root) is not None
        ):  # a module a started process runs (python -m)
            found.update(_package_chain(node.value, root))
    found.discard(file)
    return tuple(sorted(found))


def _package_chain(dotted: str, root: Path) -> list[Path]:
    """The module's file and the ``__init__.py`` of each package above it."""
    parts = dotted.split(".")
    files = []
    for end in range(1, len(parts) + 1):
        found = module_file(".".join(parts[:end]), root)
        if found is not None:
            files.append(found)
    return files


def import_closure(file: Path, root: Path = PACKAGE_DIR.parent) -> tuple[Path, ...]:
    """``file`` and every ``pipelines/`` file it reaches, directly or transitively."""
    seen: set[Path] = set()
    todo = [file.resolve(), *_package_chain(_dotted_name(file.resolve(), root), root)]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.suffix == ".py":
            todo.extend(direct_dependencies(current, root))
    return tuple(sorted(seen))


def code_dependencies(module_path: str, root: Path = PACKAGE_DIR.parent) -> tuple[str, ...]:
    """Workspace-relative paths of the code a module runs (see the module docstring)."""
    closure = import_closure(root / module_path, root)
    return tuple(p.relative_to(root).as_posix() for p in closure)
