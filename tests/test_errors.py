"""Bad input gets a ValueError or TypeError naming the argument and the offending value."""

from __future__ import annotations

import pytest
import torch

import rho_fused

N, D, V = 6, 4, 9


def inputs(**override):
    args = dict(
        hidden=torch.randn(N, D),
        weight=torch.randn(V, D),
        targets=torch.randint(0, V, (N,)),
        ref_loss=torch.rand(N),
    )
    args.update(override)
    return args


def call(options=None, **override):
    args = inputs(**override)
    return rho_fused.fused_selective_loss(
        args["hidden"], args["weight"], args["targets"], args["ref_loss"], **(options or {})
    )


@pytest.mark.parametrize(
    "override,options,error,words",
    [
        (dict(hidden=torch.randn(D)), {}, ValueError, ["hidden", "(4,)"]),
        (dict(hidden=torch.randint(0, 3, (N, D))), {}, TypeError, ["hidden", "int64"]),
        (dict(weight=torch.randn(V, D + 1)), {}, ValueError, ["weight", "(9, 5)"]),
        (dict(weight=torch.randn(V, D, dtype=torch.float64)), {}, TypeError, ["weight", "float64"]),
        (dict(targets=torch.randint(0, V, (N + 1,))), {}, ValueError, ["targets", "(7,)"]),
        (dict(targets=torch.rand(N)), {}, TypeError, ["targets", "float32"]),
        (dict(targets=torch.tensor([0, 1, V, 2, 3, 4])), {}, ValueError, ["targets", "9", "position 2"]),
        (dict(targets=torch.tensor([0, 1, -1, 2, 3, 4])), {}, ValueError, ["targets", "-1"]),
        (dict(ref_loss=torch.rand(N, 1)), {}, ValueError, ["ref_loss", "(6, 1)"]),
        (dict(ref_loss=torch.tensor([0.0, 1, float("nan"), 2, 3, 4])), {}, ValueError, ["ref_loss", "nan"]),
        (dict(ref_loss=torch.tensor([0.0, 1, 2, float("inf"), 3, 4])), {}, ValueError, ["ref_loss", "inf"]),
        (dict(ref_loss=torch.ones(N, dtype=torch.long)), {}, TypeError, ["ref_loss", "int64"]),
        (dict(weight=torch.randn(V, D, device="meta")), {}, ValueError, ["weight", "meta", "cpu"]),
        ({}, dict(keep_ratio=0.0), ValueError, ["keep_ratio", "0.0"]),
        ({}, dict(keep_ratio=1.5), ValueError, ["keep_ratio", "1.5"]),
        ({}, dict(keep_ratio="0.6"), TypeError, ["keep_ratio", "str"]),
        ({}, dict(reduction="avg"), ValueError, ["reduction", "'avg'"]),
        ({}, dict(scope="global"), ValueError, ["scope", "'global'"]),
        ({}, dict(scope="sequence"), ValueError, ["scope='sequence'", "(6,)"]),
        ({}, dict(softcap=-1.0), ValueError, ["softcap", "-1.0"]),
        ({}, dict(bias=torch.randn(V + 1)), ValueError, ["bias", "(10,)"]),
        ({}, dict(backend="cuda"), ValueError, ["backend", "'cuda'"]),
        # the contract's variants
        ({}, dict(selection="top_k"), ValueError, ["selection", "'top_k'"]),
        ({}, dict(selection="threshold", keep_ratio=0.6), ValueError, ["keep_ratio", "selection='threshold'", "0.6"]),
        ({}, dict(weighting="soft", keep_ratio=0.5), ValueError, ["keep_ratio", "weighting='soft'", "0.5"]),
        ({}, dict(weighting="soft", selection="sample"), ValueError, ["weighting='soft'", "'sample'"]),
        ({}, dict(weighting="hardest"), ValueError, ["weighting", "'hardest'"]),
        ({}, dict(threshold=0.5), ValueError, ["threshold", "0.5", "selection='topk'"]),
        ({}, dict(selection="threshold", threshold=float("nan")), ValueError, ["threshold", "nan"]),
        ({}, dict(selection="threshold", threshold="0"), TypeError, ["threshold", "str"]),
        ({}, dict(weighting="soft", temperature=0.0), ValueError, ["temperature", "0.0"]),
        ({}, dict(temperature=2.0), ValueError, ["temperature", "2.0", "selection='topk'"]),
        ({}, dict(generator=torch.Generator()), ValueError, ["generator", "selection='topk'"]),
        ({}, dict(selection="sample", generator=5), TypeError, ["generator", "int"]),
        ({}, dict(token_weights=torch.rand(N + 1)), ValueError, ["token_weights", "(7,)", "(6,)"]),
        ({}, dict(token_weights=torch.ones(N, dtype=torch.long)), TypeError, ["token_weights", "int64"]),
        (
            {},
            dict(token_weights=torch.tensor([1.0, 1, 1, -0.5, 1, 1])),
            ValueError,
            ["token_weights", "-0.5", "position 3"],
        ),
        ({}, dict(token_weights=torch.tensor([1.0, float("inf"), 1, 1, 1, 1])), ValueError, ["token_weights", "inf"]),
        (dict(ref_loss=torch.rand(2, N + 1)), {}, ValueError, ["ref_loss", "[K, *targets.shape]", "(2, 7)"]),
        (dict(ref_loss=torch.rand(0, N)), {}, ValueError, ["ref_loss", "(0, 6)"]),
        (
            dict(ref_loss=torch.tensor([[0.0] * N, [0.0, 1, 2, float("inf"), 3, 4]])),
            {},
            ValueError,
            ["ref_loss", "inf", "position 3"],
        ),
        ({}, dict(ref_reduce="median"), ValueError, ["ref_reduce", "'median'"]),
        ({}, dict(z_loss=-1e-4), ValueError, ["z_loss", "-0.0001"]),
        ({}, dict(z_loss=float("inf")), ValueError, ["z_loss", "inf"]),
        ({}, dict(label_smoothing=1.5), ValueError, ["label_smoothing", "1.5", "[0.0, 1.0]"]),
        ({}, dict(return_lse="yes"), TypeError, ["return_lse", "str"]),
    ],
)
def test_bad_input_is_named(override, options, error, words):
    with pytest.raises(error) as info:
        call(options, **override)
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_ignored_targets_may_hold_anything():
    # ref_loss at ignored positions is never read: NaN there is fine, and so is ignore_index itself.
    targets = torch.tensor([0, 1, -100, 2, -100, 4])
    ref = torch.tensor([0.0, 1, float("nan"), 2, float("inf"), 4])
    loss = call(targets=targets, ref_loss=ref)
    assert torch.isfinite(loss)


def test_value_checks_can_be_switched_off(monkeypatch):
    """Without the host read-back, a NaN reference loss is no longer refused (the price of no sync)."""
    from rho_fused import validation

    monkeypatch.setattr(validation, "CHECK_VALUES", False)
    ref = torch.tensor([0.0, 1, float("nan"), 2, 3, 4])
    assert isinstance(call(ref_loss=ref), torch.Tensor)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_token_weights_checked_at_valid_tokens_only(backend):
    """A negative weight where the target is ignored is never read."""
    targets = torch.tensor([0, 1, -100, 2, 3, 4])
    weights = torch.tensor([1.0, 1, -5.0, 1, 1, 1])
    loss = call(dict(token_weights=weights, backend=backend), targets=targets)
    assert torch.isfinite(loss)
