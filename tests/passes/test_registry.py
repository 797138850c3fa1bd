import pytest

from kiln import KilnPass, register_pass
from kiln.passes.registry import UnknownPassError, available_passes, create_pass


def test_builtins_are_registered():
    names = set(available_passes())
    assert {"fold-constants", "simplify", "eliminate-common-subexpressions", "eliminate-dead-code"} <= names


def test_register_pass_decorator_makes_a_pass_available():
    @register_pass("test-noop")
    class Noop(KilnPass):
        def __init__(self, level: int = 1):
            super().__init__()
            self.level = level

        def call(self, model):
            return self.result(model, modified=False)

    p = create_pass("test-noop", {"level": 3})
    assert isinstance(p, Noop) and p.params == {"level": 3} and p.name == "test-noop"


def test_unknown_pass_and_parameter_are_clear_errors():
    with pytest.raises(UnknownPassError, match="unknown pass 'nope'"):
        create_pass("nope")
    with pytest.raises(UnknownPassError, match="pass 'fold-constants' has no parameter 'speed' \\(it takes: shape_inference, size_limit\\)"):
        create_pass("fold-constants", {"speed": 3})


def test_name_clash_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        @register_pass("fold-constants")
        class Other(KilnPass):
            def call(self, model):
                return self.result(model, modified=False)


def test_only_kiln_passes_can_register():
    with pytest.raises(TypeError):
        register_pass("not-a-pass")(object)
