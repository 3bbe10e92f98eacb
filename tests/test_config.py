import inspect
import math
import pathlib
import warnings

import pytest
import torch

import ubcompile
from ubcompile import SamplingConfig


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf, -math.inf])
def test_p_out_of_range_is_value_error(p):
    with pytest.raises(ValueError, match=r"p must be a real number in \(0, 1\]"):
        ubcompile.backend(p=p)


@pytest.mark.parametrize("p", ["0.5", None, True, [0.5], torch.tensor(0.5)])
def test_p_not_a_real_is_type_error(p):
    with pytest.raises(TypeError, match=r"p must be a real number in \(0, 1\]"):
        ubcompile.backend(p=p)


@pytest.mark.parametrize("p", [1, 1.0, 0.25, 1e-6])
def test_p_valid(p):
    assert ubcompile.backend(p=p).config.p == float(p)


def test_unknown_grad_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="grad must be one of 'weight', 'input', 'both', got 'all'"):
        ubcompile.backend(grad="all")
    with pytest.raises(ValueError, match="sketch must be one of 'uniform', 'norm', 'lowrank', 'gaussian', 'activation', got 'topk'"):
        ubcompile.backend(sketch="topk")
    with pytest.raises(ValueError, match="axis must be one of 'rows', 'features', got 'tokens'"):
        ubcompile.backend(axis="tokens")


def test_other_options_validated():
    with pytest.raises(ValueError, match="compiler must be one of"):
        ubcompile.backend(compiler="cudagraphs")
    with pytest.raises(ValueError, match="budget_scale must be one of 'global', 'layer'"):
        ubcompile.backend(p="auto", budget_scale="adam")
    with pytest.raises(TypeError, match="seed"):
        ubcompile.backend(seed="1")
    with pytest.raises(ValueError, match="min_dim"):
        ubcompile.backend(min_dim=0)
    with pytest.raises(TypeError, match="filter must be a callable module_path -> bool"):
        ubcompile.backend(filter="blocks.0")


def test_config_is_frozen():
    config = SamplingConfig()
    with pytest.raises(AttributeError):
        config.p = 0.5  # type: ignore[misc]


def test_default_is_norm_weighted_weight_rows():
    assert SamplingConfig() == SamplingConfig(p=0.25, grad="weight", sketch="norm", axis="rows", min_dim=64)


@pytest.mark.parametrize("grad, axis", [("weight", "rows"), ("input", "features"), ("both", "features")])
def test_axis_defaults_by_grad_mode(grad, axis):
    assert SamplingConfig(grad=grad).axis == axis


def test_torch_versions_old_refused_new_warned():
    from ubcompile._torch_private import check_torch_version

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for known in ("2.11.0+cu126", "2.13.0+cpu", "2.14.1", "2.15.0"):
            check_torch_version(known)
    with pytest.raises(ImportError, match="ubcompile needs torch 2.11 or later, found 2.10.0"):
        check_torch_version("2.10.0")
    with pytest.warns(UserWarning, match="checked against torch up to 2.15; found 2.16.0.dev20270101"):
        check_torch_version("2.16.0.dev20270101")


def test_the_torch_requirement_has_no_upper_cap():
    """A cap would make pip replace a user's (CUDA) torch by an older release."""
    import tomllib

    text = (pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text()
    (torch_req,) = [d for d in tomllib.loads(text)["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req == "torch>=2.11"


@pytest.mark.parametrize("p", [0.25, "auto"])
def test_backend_defaults_are_the_configs(p):
    """Every option ``backend()`` leaves unset has ``SamplingConfig``'s default (issue 18: a second
    default of ``budget`` in ``backend``'s signature made ``p="auto"`` run at 0.5, not the validated 0.1)."""
    made = ubcompile.backend(p=p).config
    assert made == ubcompile.SamplingConfig(p=p)
    assert made.budget == ubcompile.SamplingConfig.budget == 0.1


def test_backend_restates_no_default():
    """``backend`` forwards its options to ``SamplingConfig``: one place for each default."""
    defaults = [prm.name for prm in inspect.signature(ubcompile.backend).parameters.values()
                if prm.default is not inspect.Parameter.empty]
    assert defaults == []


def test_unknown_backend_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="budget"):
        ubcompile.backend(budjet=0.1)
