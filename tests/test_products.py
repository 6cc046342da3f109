"""The chunked backend's CPU products: oneDNN's bf16 mode for bf16 inputs, set and restored around them."""

from __future__ import annotations

import threading

import pytest
import torch
from cases import assert_parity, make_case

from rho_fused.backends import chunked, products

needs_modes = pytest.mark.skipif(
    products._matmul_precision() is None, reason="this torch has no oneDNN fp32 precision modes (torch < 2.9)"
)


def _bf16_pair(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 8).bfloat16(), torch.randn(16, 8).bfloat16()


@needs_modes
def test_bf16_products_set_the_mode_and_restore_it(monkeypatch):
    monkeypatch.setattr(products, "BF16_PRODUCTS", True)
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    with products.bf16_products(*_bf16_pair()) as on:
        assert on and matmul.fp32_precision == "bf16"
    assert matmul.fp32_precision == before
    with pytest.raises(ValueError, match="inside"), products.bf16_products(*_bf16_pair()):
        raise ValueError("inside")
    assert matmul.fp32_precision == before
    # fp32, fp16 or mixed inputs are not bf16 values: their products stay in fp32
    h, w = _bf16_pair()
    for pair in ((h.float(), w.float()), (h.half(), w.half()), (h, w.float())):
        with products.bf16_products(*pair) as on:
            assert not on and matmul.fp32_precision == before
    monkeypatch.setattr(products, "BF16_PRODUCTS", False)
    with products.bf16_products(h, w) as on:
        assert not on and matmul.fp32_precision == before


@needs_modes
def test_bf16_products_only_where_the_cpu_has_bf16_units(monkeypatch):
    """oneDNN's own check accepts any AVX-512 CPU: the mode needs AMX tiles or AVX512-BF16."""
    monkeypatch.setattr(products, "BF16_PRODUCTS", None)
    pair = _bf16_pair()
    for amx, avx512_bf16 in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert products.bf16_available(*pair) == (amx or avx512_bf16)


@needs_modes
def test_bf16_products_of_overlapping_threads_restore_the_mode_once(monkeypatch):
    """A enters, B enters, A leaves (B still inside: still bf16), B leaves: the mode found first is back."""
    monkeypatch.setattr(products, "BF16_PRODUCTS", True)
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    seen: list[str] = []

    def thread_a() -> None:
        with products.bf16_products(*_bf16_pair()):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(5)
        with products.bf16_products(*_bf16_pair()):
            b_in.set()
            a_out.wait(5)
            seen.append(matmul.fp32_precision)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == ["bf16"] and matmul.fp32_precision == before and products._mode_users == 0


@needs_modes
def test_bf16_values_multiply_as_in_fp32_and_others_round():
    """In the mode, operands holding bf16 values give the fp32 product's accuracy (their rounding to
    bf16 is exact); other fp32 operands are rounded to bf16 first, where the CPU runs the mode."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(96, 256, generator=g)
    a16, b16 = a.bfloat16().float(), b.bfloat16().float()
    with products.bf16_products(a16.bfloat16(), b16.bfloat16()) as on:
        exact, rounded = products.linear(a16, b16), products.linear(a, b16)
    scale = 16.0  # ~ sqrt(256): the products' size
    assert (exact.double() - a16.double() @ b16.double().T).abs().max() <= 1e-5 * scale
    err = (rounded.double() - a.double() @ b16.double().T).abs().max().item()
    if not on:
        assert err <= 1e-5 * scale
    else:  # a rounded to bf16: ~ 2^-9 * scale over the sum, where the CPU honours the mode (AMX does)
        assert err < 2e-2 * scale
        if torch.cpu._is_amx_tile_supported():
            assert err > 1e-4 * scale


@needs_modes
def test_in_place_choice_measured_per_mode(monkeypatch):
    monkeypatch.setattr(products, "IN_PLACE_PRODUCTS", None)
    monkeypatch.setattr(products, "_measured", {})
    monkeypatch.setattr(products, "BF16_PRODUCTS", True)
    products.in_place(torch.device("cpu"), torch.float32)
    with products.bf16_products(*_bf16_pair()):
        products.in_place(torch.device("cpu"), torch.float32)
    assert set(products._measured) == {str(torch.backends.mkldnn.matmul.fp32_precision), "bf16"}
    monkeypatch.setattr(products, "IN_PLACE_PRODUCTS", False)
    assert products.in_place(torch.device("cpu"), torch.float32) is False


@needs_modes
@pytest.mark.parametrize("keep_ratio", [0.6, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_bf16_in_the_mode_matches_pytorch(monkeypatch, keep_ratio, reduction):
    """bf16 inputs with the mode forced on (any CPU): every product of the forward and the backward
    ran in it, and the loss and gradients are as near the fp64 truth as PyTorch's in bf16."""
    monkeypatch.setattr(products, "BF16_PRODUCTS", True)
    monkeypatch.setattr(products, "IN_PLACE_PRODUCTS", True)  # the one pass by rows
    modes: dict[str, str] = {}
    for name in ("_forward", "_backward", "_single_pass", "_single_pass_rows"):
        inner = getattr(chunked, name)

        def spy(*args, name=name, inner=inner):
            modes[name] = torch.backends.mkldnn.matmul.fp32_precision
            return inner(*args)

        monkeypatch.setattr(chunked, name, spy)
    # a backward of several blocks of rows: plain CE then takes the one pass
    for name, value in (
        ("BACKWARD_BUDGET_BYTES", 6 * 12 * 40 * 4),
        ("BACKWARD_BUDGET_OF_DW", 0.0),
        ("ONE_BLOCK_OF_DW", 0.0),
    ):
        monkeypatch.setattr(chunked, name, value)
    case = make_case((3, 11), 40, 97, seed=5, bias=True)
    assert_parity(case, "chunked", torch.bfloat16, keep_ratio=keep_ratio, reduction=reduction)
    expected = {"_single_pass_rows"} if keep_ratio == 1.0 and reduction == "mean" else {"_forward", "_backward"}
    assert modes == dict.fromkeys(expected, "bf16")
