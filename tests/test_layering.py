"""The package's shape: imports run down only (cli -> recipes -> train/eval/serve/export/kb -> methods/data ->
models/config -> files/errors), never back up. Within one level a package may use another (serve uses eval)."""

import ast
from pathlib import Path

import glmtune

LEVELS = {
    "cli": 0, "__main__": 0, "memory": 0,  # memory: the estimator behind `glmtune estimate-memory`
    "recipes": 1,
    "train": 2, "eval": 2, "serve": 2, "export": 2, "kb": 2,
    "methods": 3, "data": 3,
    "models": 4, "config": 4, "llamafactory_keys": 4,
    "files": 5, "errors": 5, "extras": 5, "demo_data": 5,
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("glmtune.")}


def test_no_import_runs_back_up():
    root = Path(glmtune.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        package = path.relative_to(root).parts[0].removesuffix(".py")
        if package == "__init__":
            continue
        assert package in LEVELS, f"{package}: give the new package a level in this test"
        upward += [f"{path.relative_to(root)} imports glmtune.{target}" for target in imported_packages(path)
                   if target != package and LEVELS[target] < LEVELS[package]]
    assert upward == []
