"""MARK's Mamba-2 (src/mamba/model.py, ssd.py, loss.py) against transformers'
reference implementation and against autograd."""

import pytest
import torch
import torch.nn.functional as F

from src.mamba.loss import linear_cross_entropy, token_cross_entropy
from src.mamba.model import MambaArgs, MambaLM, causal_depthwise_conv, to_hf_config
from src.mamba.ssd import ssd_chunked


def _perturbed_model(args: MambaArgs, seed: int = 0) -> MambaLM:
    """A model whose decay rates, skips and step sizes differ per head (not the init values)."""
    torch.manual_seed(seed)
    model = MambaLM(args)
    with torch.no_grad():
        for block in model.backbone.layers:
            for param in (block.mixer.A_log, block.mixer.D, block.mixer.dt_bias):
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "groups, tied, length, chunk",
    [(1, True, 100, 32), (2, False, 130, 32), (1, True, 64, 64), (4, True, 7, 16)],
)
def test_logits_equal_transformers_mamba2_on_the_same_weights(groups, tied, length, chunk):
    from transformers import Mamba2ForCausalLM

    args = MambaArgs(vocab_size=300, d_model=64, n_layers=2, n_heads=4, state_size=16, n_groups=groups,
                     chunk_size=chunk, tie_embeddings=tied)
    ours = _perturbed_model(args)
    reference = Mamba2ForCausalLM(to_hf_config(args)).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours(ids).logits
        theirs = reference(ids, use_cache=False).logits
    assert mine.shape == theirs.shape == (2, length, 300)
    assert (mine - theirs).abs().max().item() <= 1e-4


def test_gradients_equal_transformers_mamba2():
    from transformers import Mamba2ForCausalLM

    args = MambaArgs(vocab_size=200, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=16)
    ours = _perturbed_model(args).train()
    reference = Mamba2ForCausalLM(to_hf_config(args)).train()
    reference.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 200, (2, 45), generator=torch.Generator().manual_seed(2))
    ours(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    logits = reference(ids[:, :-1], use_cache=False).logits
    F.cross_entropy(logits.reshape(-1, 200), ids[:, 1:].reshape(-1)).backward()
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        diff = (param.grad - theirs[name].grad).abs().max().item()
        assert diff <= 1e-4 * max(1.0, theirs[name].grad.abs().max().item()), name


def test_chunked_scan_gradients_match_finite_differences():
    torch.manual_seed(0)
    d = torch.float64
    for groups, length, chunk, with_state in [(2, 10, 4, True), (1, 8, 4, False), (4, 7, 3, True)]:
        x = torch.randn(2, length, 4, 2, dtype=d, requires_grad=True)
        dt = torch.rand(2, length, 4, dtype=d, requires_grad=True)
        A = (-torch.rand(4, dtype=d) - 0.2).requires_grad_()
        B = torch.randn(2, length, groups, 3, dtype=d, requires_grad=True)
        C = torch.randn(2, length, groups, 3, dtype=d, requires_grad=True)
        D = torch.randn(4, dtype=d, requires_grad=True)
        inputs = [x, dt, A, B, C, D]
        if with_state:
            inputs.append(torch.randn(2, 4, 2, 3, dtype=d, requires_grad=True))

        def scan(*a):
            return ssd_chunked(a[0], a[1], a[2], a[3], a[4], chunk, a[5], a[6] if with_state else None, True)

        assert torch.autograd.gradcheck(scan, inputs, fast_mode=True)


def test_causal_conv_matches_conv1d_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 9 + 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 1, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    reference = F.conv1d(x.transpose(1, 2), w, b, groups=5).transpose(1, 2)
    assert torch.allclose(causal_depthwise_conv(x, w, b), reference)
    assert torch.autograd.gradcheck(causal_depthwise_conv, (x, w, b))


def test_state_carries_across_calls_and_single_steps():
    args = MambaArgs(vocab_size=120, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=8)
    model = _perturbed_model(args)
    ids = torch.randint(0, 120, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :23], return_cache=True)
        second = model(ids[:, 23:], cache=first.cache).logits
        assert (torch.cat([first.logits, second], 1) - full).abs().max() < 1e-5
        cache, stepped = first.cache, []
        for t in range(23, 40):
            logits, cache = model.step(ids[:, t], cache)
            stepped.append(logits)
        assert (torch.stack(stepped, 1) - full[:, 23:]).abs().max() < 1e-5


def test_fused_cross_entropy_equals_cross_entropy_of_logits():
    import src.mamba.loss as loss_module

    torch.manual_seed(0)
    hidden = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (37,))
    labels[::5] = -100
    old = loss_module.CHUNK_ELEMENTS
    loss_module.CHUNK_ELEMENTS = 64  # several chunks
    try:
        fused = linear_cross_entropy(hidden, weight, labels)
        per_token = token_cross_entropy(hidden, weight, labels)
    finally:
        loss_module.CHUNK_ELEMENTS = old
    reference = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    assert abs(fused.item() - reference.item()) < 1e-5
    expected = torch.autograd.grad(reference * 2, (hidden, weight))
    got = torch.autograd.grad(fused * 2, (hidden, weight))
    for a, b in zip(expected, got):
        assert (a - b).abs().max() < 1e-5
    ref_tokens = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    assert (per_token - ref_tokens).abs().max() < 1e-5


def test_forward_with_labels_equals_loss_of_logits():
    args = MambaArgs(vocab_size=90, d_model=16, n_layers=1, n_heads=2, state_size=4, chunk_size=8)
    model = _perturbed_model(args)
    ids = torch.randint(0, 90, (2, 21), generator=torch.Generator().manual_seed(4))
    labels = ids[:, 1:].clone()
    labels[1, 15:] = -100
    with torch.no_grad():
        out = model(ids[:, :-1], labels=labels)
        logits = model(ids[:, :-1]).logits
    assert out.logits is None and out.hidden_states.shape == (2, 20, 16)
    expected = F.cross_entropy(logits.reshape(-1, 90), labels.reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - expected.item()) < 1e-5


def test_compile_option_gives_the_eager_loss_gradients_and_state_dict_keys():
    """``model.compile: true`` (``MambaLM(args, compile=True)``): torch.compile of each block on
    CPU, one training step equal to eager, checkpoints interchangeable."""
    args = MambaArgs(vocab_size=100, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=8)
    eager = _perturbed_model(args).train()
    compiled = MambaLM(args, compile=True).train()
    compiled.load_state_dict(eager.state_dict(), strict=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(5))
    losses = []
    for model in (eager, compiled):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    reference = dict(eager.named_parameters())
    for name, param in compiled.named_parameters():
        assert (param.grad - reference[name].grad).abs().max().item() < 1e-5, name


def test_bf16_autocast_loss_stays_near_fp32_with_fp32_decays_and_state():
    """The GPU path's precision on CPU: under bf16 autocast the projections run in bf16 while
    the SSD scan (decays, states) and the loss stay float32; the loss is within 2% of fp32
    and the returned recurrent state is float32."""
    args = MambaArgs(vocab_size=300, d_model=64, n_layers=2, n_heads=4, state_size=16, chunk_size=16)
    model = _perturbed_model(args).train()
    ids = torch.randint(0, 300, (2, 65), generator=torch.Generator().manual_seed(6))
    fp32 = model(ids[:, :-1], labels=ids[:, 1:]).loss
    fp32.backward()
    fp32_grad = model.backbone.layers[0].mixer.A_log.grad.clone()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(ids[:, :-1], labels=ids[:, 1:]).loss
        out = model.eval()(ids, return_cache=True)
    bf16.backward()
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) <= 0.02 * fp32.item()
    assert all(s.dtype == torch.float32 for s in out.cache.ssm) and out.logits.dtype == torch.float32
    bf16_grad = model.backbone.layers[0].mixer.A_log.grad
    assert torch.nn.functional.cosine_similarity(bf16_grad, fp32_grad, dim=0) > 0.95
    # Decoding continues the bf16 prefill's state in float32.
    logits = model.step_(ids[:, -1], out.cache)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
