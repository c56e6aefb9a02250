"""Data, rewards and evaluation sit below the trainer: they never import train/, megatron/ or torch.distributed."""
import pytest

from tests.unit.test_layering import MODULES, _offenders


@pytest.mark.parametrize("package", ["data", "rewards", "evaluation"])
def test_inputs_packages_sit_below_the_trainer(package):
    assert any(m.startswith(package + "/") for m in MODULES)
    assert _offenders(lambda m: m.startswith(package + "/"),
                      lambda n: n.startswith(("vespo_megatron.train", "vespo_megatron.megatron", "megatron",
                                              "torch.distributed"))) == []
