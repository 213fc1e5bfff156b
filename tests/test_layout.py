"""The layout follows the data flow (DESIGN §8): each module imports only modules listed before it."""

import ast
from pathlib import Path

import brainmech

#: Lowest first: a module may import only modules before it (function-level imports included).
LAYERS = ["version", "errors", "choices", "allocator", "inputs", "mechanics", "fields", "subject", "mni", "atrophy", "scenarios", "pseudo_subjects",
          "solver", "network", "metrics", "figures", "simulator", "series", "transforms", "measurement", "estimation", "acquisition", "cohort", "scoring", "evaluation", "train", "cli"]
PACKAGE = Path(brainmech.__file__).parent


def package_imports(path: Path) -> set[str]:
    """The brainmech modules a source file imports, anywhere in it."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("brainmech"):
            imported.add(node.module.removeprefix("brainmech").lstrip(".").split(".")[0] or "__init__")
        elif isinstance(node, ast.Import):
            imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("brainmech."))
    return imported


def test_every_module_is_placed_in_the_layers():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


def test_no_module_imports_one_above_it():
    for position, module in enumerate(LAYERS):
        above = package_imports(PACKAGE / f"{module}.py") - set(LAYERS[:position])
        assert not above, f"{module} imports {sorted(above)}, which come after it in the layers"


def test_each_module_says_what_it_holds_in_its_first_line():
    for module in ["__init__", *LAYERS]:
        docstring = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text()))
        assert docstring and len(docstring.splitlines()[0]) > 20, module
