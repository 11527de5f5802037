"""The package's layering (docs/layout.md): shared modules at the bottom, the commands side by side above them, the
CLI on top, and no import circle anywhere (a module never needs itself through others). Imports are read with
``ast``, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

from monai_diffusion.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "monai_diffusion"
COMMAND_MODULES = {module for module, _ in COMMANDS.values()}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str | None = None) -> set[str]:
    """Every module the file ``path`` (module ``name``) imports, ``from package import module`` resolved to
    ``package.module`` and relative imports to absolute ones."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = package_modules()
    return {name: (imported_modules(path, name) & set(modules)) - {name} for name, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Circles of imports in ``graph``, each as the path that closes it (``[a, b, a]``); empty when there is none."""
    circles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for imported in sorted(graph.get(name, ())):
            visit(imported, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return circles


def test_every_command_is_a_module_of_the_package():
    assert COMMAND_MODULES <= set(package_modules())


def test_no_command_module_imports_another_command_module():
    offending = {
        name: sorted(imported_modules(path) & (COMMAND_MODULES - {name}))
        for name, path in package_modules().items()
        if name in COMMAND_MODULES
    }
    assert not {name: found for name, found in offending.items() if found}


def test_shared_modules_import_no_command():
    offending = {
        name: sorted(imported_modules(path) & COMMAND_MODULES)
        for name, path in package_modules().items()
        if name not in COMMAND_MODULES and name != "monai_diffusion.cli"
    }
    assert not {name: found for name, found in offending.items() if found}


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    # The form latents.py once used to dodge the import cost must be caught, and so must a relative import.
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from monai_diffusion.train_autoencoder import SHAPE_KEYS\n\n\n"
                      "from monai_diffusion import sample\nfrom . import train_ldm\n")
    found = imported_modules(sneaky, "monai_diffusion.sneaky")
    assert {"monai_diffusion.train_autoencoder", "monai_diffusion.sample", "monai_diffusion.train_ldm"} <= found


def test_no_import_circle():
    # data/ had one (datasets <-> preprocessed, dodged by an import inside a function); none may come back anywhere.
    assert import_circles(import_graph()) == []


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert import_circles(graph) == [["a", "b", "c", "a"]]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
