"""The packages import one way: `core` (the shared base, every preset's schemas included:
`core.settings`) at the bottom, then `trainers`, `factory` and `eval`, each importing only the
layers below it, with no exceptions: every command validates the whole preset from
`core.settings`, and the evidence experiment, which runs factory builds, is `eval.experiment`'s.
Read from the source (ast), so it costs milliseconds and names every violating import with its
file and line."""

from __future__ import annotations

import ast
from pathlib import Path

from core.settings.run import REPO_ROOT

# bottom to top; `demo` (the embedded default's workshop) on top: nothing in the product imports it
# (the demo presets name its committed weights as model folders), and it reads the product's
# definition of a loadable folder (`factory.models.locate.MARKER_FILES`)
LAYERS = ("core", "trainers", "factory", "eval", "demo")


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
            for line, module in _imports(path):
                target = module.split(".")[0]
                if target not in LAYERS or target in allowed:
                    continue
                violations.append(f"{path.relative_to(root)}:{line} imports {module} ({package} is below {target})")
    return violations


def test_packages_import_only_the_layers_below_them() -> None:
    violations = layer_violations()
    assert not violations, "imports against the layer order core < trainers < factory < eval:\n" + "\n".join(violations)
