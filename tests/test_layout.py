"""The import rules of docs/architecture.md hold: imports go one way, no import cycles, tools never import the
job's entry point, and every `_target_` in conf/ names something that exists."""

import ast
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_object

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "train")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Project modules `path` imports anywhere in the file (module level and inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in PACKAGES}
    return out


FILES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
MODULES = set(FILES)
IMPORTS = {m: {i for i in project_imports(p) if i in FILES} for m, p in FILES.items()}


def allowed(importer: str, imported: str) -> bool:
    if importer.startswith("models"):
        return imported.startswith("models")
    if importer.startswith("data"):
        return imported.startswith("data") or imported == "models.config"
    if importer.startswith("train.infra"):
        return not imported.startswith("train") or imported.startswith("train.infra")
    if importer.startswith("train.tools"):
        return imported not in ("train.run", "train.__main__")
    return importer == "train.__main__" or imported not in ("train.run", "train.__main__")  # nothing imports the job


def test_imports_follow_the_package_map():
    bad = [f"{a} imports {b}" for a, targets in IMPORTS.items() for b in sorted(targets) if not allowed(a, b)]
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: {t for t in targets if t != m} for m, targets in IMPORTS.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def targets(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_" and isinstance(v, str):
                yield v
            yield from targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from targets(v)


@pytest.mark.parametrize("path", sorted((ROOT / "conf").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT / "conf")))
def test_conf_targets_exist(path):
    for target in targets(yaml.safe_load(path.read_text()) or {}):
        assert get_object(target) is not None, target
