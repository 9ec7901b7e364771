"""Parity of mamba_ssm's fused CUDA kernels with MARK's own scan and convolution
(src/mamba/ssd.py ``fused_kernels``). Skipped, with the reason, where there is no GPU or the
kernels are not installed (as on CPU-only machines)."""

import pytest
import torch
import torch.nn.functional as F

from src.mamba.model import MambaArgs, MambaLM, causal_depthwise_conv
from src.mamba.ssd import fused_kernels, ssd_chunked

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _kernel(name: str):
    kernel = fused_kernels().get(name)
    if kernel is None:
        pytest.skip(f"{name} is not importable (pip install mamba-ssm causal-conv1d on a CUDA machine)")
    return kernel


@needs_cuda
@pytest.mark.parametrize("groups, length, with_state", [(1, 256, False), (2, 200, True)])
def test_mamba_chunk_scan_combined_matches_ssd_chunked(groups, length, with_state):
    scan = _kernel("mamba_chunk_scan_combined")
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, n = 2, 8, 64, 64
    x = torch.randn(b, length, h, p, device="cuda", generator=gen)
    dt_raw = torch.randn(b, length, h, device="cuda", generator=gen) - 2
    dt_bias = torch.rand(h, device="cuda", generator=gen)
    A = -torch.rand(h, device="cuda", generator=gen) - 0.5
    B = torch.randn(b, length, groups, n, device="cuda", generator=gen) * n**-0.5
    C = torch.randn(b, length, groups, n, device="cuda", generator=gen) * n**-0.5
    D = torch.randn(h, device="cuda", generator=gen)
    state = torch.randn(b, h, p, n, device="cuda", generator=gen) if with_state else None
    theirs, their_state = scan(x, dt_raw, A, B, C, 64, D=D, dt_bias=dt_bias, initial_states=state,
                               dt_softplus=True, return_final_states=True)
    ours, our_state = ssd_chunked(x, F.softplus(dt_raw + dt_bias), A, B, C, 64, D, state, True)
    assert (theirs.float() - ours).abs().max().item() < 2e-3
    assert (their_state.float() - our_state).abs().max().item() < 2e-3


@needs_cuda
def test_causal_conv1d_matches_causal_depthwise_conv():
    conv = _kernel("causal_conv1d_fn")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 100, 640, device="cuda", generator=gen)
    weight = torch.randn(640, 1, 4, device="cuda", generator=gen)
    bias = torch.randn(640, device="cuda", generator=gen)
    theirs = conv(x.transpose(1, 2), weight.squeeze(1), bias, activation="silu").transpose(1, 2)
    ours = F.silu(causal_depthwise_conv(F.pad(x, (0, 0, 3, 0)), weight, bias))
    assert (theirs - ours).abs().max().item() < 1e-4


@needs_cuda
def test_model_on_fused_kernels_matches_marks_scan_forward_and_backward():
    _kernel("mamba_chunk_scan_combined")
    args = MambaArgs(vocab_size=512, d_model=128, n_layers=2, n_heads=4, state_size=64, chunk_size=64)
    torch.manual_seed(0)
    model = MambaLM(args).cuda()
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    results = []
    for fused in (True, False):
        for block in model.backbone.layers:
            block.mixer.use_fused_kernels = fused
        model.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        results.append((loss.item(), model.backbone.layers[0].mixer.in_proj.weight.grad.clone()))
    (fused_loss, fused_grad), (mark_loss, mark_grad) = results
    assert abs(fused_loss - mark_loss) < 1e-3
    assert (fused_grad - mark_grad).abs().max().item() < 1e-3 * max(1.0, mark_grad.abs().max().item())


def test_cpu_forward_never_calls_the_fused_kernels(monkeypatch):
    """Kernels that happen to be importable are used on CUDA tensors only."""
    called = []
    fake = {"mamba_chunk_scan_combined": lambda *a, **k: called.append("scan"),
            "causal_conv1d_fn": lambda *a, **k: called.append("conv")}
    monkeypatch.setattr("src.mamba.model.fused_kernels", lambda: fake)
    model = MambaLM(MambaArgs(vocab_size=100, d_model=16, n_layers=1, n_heads=2, state_size=4, chunk_size=8))
    out = model(torch.randint(0, 100, (1, 12)))
    assert called == [] and out.logits.shape == (1, 12, 100)
