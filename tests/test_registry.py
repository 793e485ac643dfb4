import pytest

from qrobust.errors import ConfigError
from qrobust.registry import Registry


def test_unknown_name_lists_valid_names():
    reg: Registry[int] = Registry("attack")
    reg.register("pgd")(1)
    reg.register("fgsm")(2)
    with pytest.raises(ConfigError, match=r"unknown attack 'pgdd'; valid: fgsm, pgd"):
        reg.get("pgdd")
    assert reg.get("pgd") == 1 and reg.names() == ["fgsm", "pgd"] and "fgsm" in reg


def test_double_registration_is_a_bug():
    reg: Registry[int] = Registry("model")
    reg.register("a")(1)
    with pytest.raises(ValueError):
        reg.register("a")(2)
