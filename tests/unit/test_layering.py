"""Imports point down (shared/docs/architecture.md): checked on the import statements of every module."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vespo_megatron"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = {path.relative_to(PACKAGE).as_posix(): _imports(path) for path in PACKAGE.rglob("*.py")}


def _offenders(where, forbidden) -> list[str]:
    return sorted(f"{module}: {name}" for module, names in MODULES.items() if where(module)
                  for name in names if forbidden(name))


def test_modules_were_found():
    assert {"megatron/model.py", "objectives/losses.py", "convert/spec.py", "mismatch/score.py"} <= set(MODULES)


def test_megatron_core_only_under_megatron():
    assert _offenders(lambda m: not m.startswith("megatron/"),
                      lambda n: n == "megatron" or n.startswith("megatron.")) == []


@pytest.mark.parametrize("package", ["objectives", "metrics", "packing"])
def test_pure_packages_import_no_distributed_and_no_megatron(package):
    assert _offenders(lambda m: m.startswith(package + "/"),
                      lambda n: n.startswith(("torch.distributed", "megatron", "vespo_megatron.megatron"))) == []


def test_objectives_never_import_metrics():
    assert _offenders(lambda m: m.startswith("objectives/"), lambda n: n.startswith("vespo_megatron.metrics")) == []


def test_megatron_never_imports_convert():
    assert _offenders(lambda m: m.startswith("megatron/"), lambda n: n.startswith("vespo_megatron.convert")) == []


def test_convert_imports_megatron_only_to_build_parity_models():
    assert _offenders(lambda m: m.startswith("convert/") and m != "convert/parity.py",
                      lambda n: n.startswith("vespo_megatron.megatron")) == []


def test_hf_config_is_below_everything():
    assert _offenders(lambda m: m == "hf_config.py", lambda n: n.startswith("vespo_megatron.")) == []
