"""A kernel module is checked against the `KernelModule` protocol when it is loaded (built-in, `--kernel
module.path` or the runtime), with an error naming each missing piece, before anything is compiled or written."""
from __future__ import annotations

import sys
import types

import pytest
from click.testing import CliRunner

from autotune.cli.app import main
from autotune.kernel_protocol import load_kernel, load_target_kernel, protocol_gaps, target_gaps
from kernels import Problem


@pytest.mark.parametrize("name", ["gpu", "tpu", "tests.toy_kernel"])
def test_the_built_in_kernels_and_the_test_kernel_offer_the_protocol(name):
    module = load_kernel(name)
    assert protocol_gaps(module) == []
    problem = Problem(batch=1, q_len=64, kv_len=64, heads=2, kv_heads=1, head_dim=32)
    config = module.Config.default(problem, device_kind=None)
    assert module.Config.from_dict(config.to_dict()) == config
    assert set(module.search_space(problem)) <= set(config.to_dict())
    assert module.invalid_reasons(config, problem, device_kind=None) == []


@pytest.fixture
def fake_kernel():
    """A module named `fake_kernel_for_protocol` with the whole surface, to break piece by piece."""

    class Config:
        @classmethod
        def default(cls, problem, *, device_kind=None):
            return cls()

        @classmethod
        def from_dict(cls, data):
            return cls()

        def to_dict(self):
            return {}

    module = types.ModuleType("fake_kernel_for_protocol")
    module.NAME, module.VERSION, module.Config = "fake", "1", Config
    module.search_space = lambda problem: {}
    module.invalid_reasons = lambda config, problem, *, device_kind=None: []
    module.flash_attention = lambda q, k, v, *, causal=False, segment_ids=None, config=None, interpret=False: q
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


@pytest.mark.parametrize("platform, roles", [("gpu", ("forward", "dq", "dkv")), ("tpu", ("forward", "dq", "dkv"))])
def test_compile_targets_load_kernels_with_a_memory_estimate(platform, roles):
    module = load_target_kernel(platform)
    assert target_gaps(module) == []
    problem = Problem(batch=1, q_len=256, kv_len=256, heads=2, kv_heads=1, head_dim=64, backward=True)
    config = module.Config.default(problem, device_kind=None)
    estimate = module.memory_estimate(config, problem, device_kind=None)
    assert tuple(estimate) == roles and all(isinstance(v, int) and v > 0 for v in estimate.values())
    assert tuple(module.memory_estimate(config, problem.replace(backward=False))) == ("forward",)


def test_a_kernel_without_a_memory_estimate_cannot_be_compiled_for_targets(fake_kernel):
    assert load_kernel("fake_kernel_for_protocol") is fake_kernel  # enough to search and run
    assert target_gaps(fake_kernel) == ["memory_estimate()", "flash_attention() keyword(s) device_kind"]
    fake_kernel.memory_estimate = lambda config, problem, *, device_kind=None: {"forward": 1}
    fake_kernel.flash_attention = lambda q, k, v, *, device_kind=None, **kwargs: q
    assert target_gaps(fake_kernel) == []


def test_a_complete_module_loads(fake_kernel):
    assert load_kernel("fake_kernel_for_protocol") is fake_kernel


def test_each_missing_piece_is_named(fake_kernel):
    del fake_kernel.VERSION
    fake_kernel.invalid_reasons = lambda config, problem: []
    fake_kernel.Config.default = classmethod(lambda cls, problem: cls())
    with pytest.raises(ValueError) as error:
        load_kernel("fake_kernel_for_protocol")
    text = str(error.value)
    assert "'fake_kernel_for_protocol'" in text
    assert "VERSION" in text and "invalid_reasons() keyword(s) device_kind" in text
    assert "Config.default(problem, *, device_kind)" in text
    assert "NAME" not in text and "flash_attention" not in text and "search_space" not in text


def test_a_user_kernel_lacking_the_protocol_is_refused_by_the_cli_before_any_write(fake_kernel, tmp_path):
    del fake_kernel.search_space
    db = tmp_path / "results.db"
    result = CliRunner().invoke(main, ["search", "--batch", "1", "--seq-len", "32", "--heads", "1", "--head-dim",
                                       "16", "--kernel", "fake_kernel_for_protocol", "--db", str(db)])
    assert result.exit_code == 2, result.output
    assert "--kernel" in result.output and "search_space()" in result.output
    assert not db.exists()


def test_an_unimportable_module_is_named():
    with pytest.raises(ValueError, match="'no_such_kernel_module'"):
        load_kernel("no_such_kernel_module")
