"""Dependencies point one way (STYLE.md): cli -> chain -> train -> {grow, distill, loss, data} -> families.

Nothing below the trainer imports train, chain or cli, so each piece stays usable on its own
(``grow`` on state dicts, ``cost`` without a training run, ``data`` without a model).
"""

import ast
from pathlib import Path

import pytest

import compt

PACKAGE = Path(compt.__file__).parent
HIGH = {"compt.engine.train", "compt.chain", "compt.cli"}
# Who may import each high-level module (a module may always import what sits below it).
ALLOWED = {
    # The fine-tune's loop is a trainer too, built on this one's step (issue 16).
    "compt.engine.train": {"compt.chain", "compt.cli", "compt.paradigms.clip.finetune.train"},
    "compt.chain": {"compt.cli"},
    "compt.cli": {"compt.__main__", "compt.cli"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("compt")}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_low_modules_do_not_import_high_ones(path):
    importer = _module_name(path)
    for imported in _imports(path):
        for high in HIGH:
            if imported == high or imported.startswith(high + "."):
                owner = next((k for k in ALLOWED if importer == k or importer.startswith(k + ".")), importer)
                assert owner in ALLOWED[high] or owner == high, f"{importer} imports {imported}"


SHARED = (
    "compt.engine",
    "compt.grow",
    "compt.chain",
    "compt.cost",
    "compt.plan",
    "compt.distill",
    "compt.report",
)


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_shared_layers_name_no_paradigm(path):
    """Issue 14: the engine, chain, growth, cost, distillation and reports know no paradigm by name;
    they reach a paradigm only through the registry in compt.paradigms."""
    importer = _module_name(path)
    if not importer.startswith(SHARED):
        return
    for imported in _imports(path):
        assert not imported.startswith("compt.paradigms."), f"{importer} imports {imported}"
