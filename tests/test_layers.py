"""The packages import one way: `core` (the shared base) at the bottom, then `trainers`, `eval` and
`factory`, each importing only the layers below it. Read from the source (ast), so it costs
milliseconds and names every violating import with its file and line.

Two exceptions, stated: the entry points of the lower layers (`trainers/*/__main__.py`,
`eval/*/__main__.py`) read a run preset, and the composed run config lives in one thin module at
the top (`factory.run_config`); and `python -m eval.experiment` runs the whole chain, whose
composition (builds included) is `factory.experiment` at the top. Only the entry points may
import those, and only those.
"""

from __future__ import annotations

import ast
from pathlib import Path

from factory.run_config import REPO_ROOT

LAYERS = ("core", "trainers", "eval", "factory")  # bottom to top
TOP_COMPOSITIONS = {"factory.run_config": "*", "factory.experiment": "eval/experiment/__main__.py"}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def layer_violations(root: Path = REPO_ROOT) -> list[str]:
    violations = []
    for rank, package in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((root / package).rglob("*.py")):
            entry_point = path.name == "__main__.py"
            for line, module in _imports(path):
                target = module.split(".")[0]
                if target not in LAYERS or target in allowed:
                    continue
                allowed_in = TOP_COMPOSITIONS.get(module)
                if entry_point and allowed_in in ("*", path.relative_to(root).as_posix()):
                    continue
                violations.append(f"{path.relative_to(root)}:{line} imports {module} ({package} is below {target})")
    return violations


def test_packages_import_only_the_layers_below_them() -> None:
    violations = layer_violations()
    assert not violations, "imports against the layer order core < trainers < eval < factory:\n" + "\n".join(violations)
