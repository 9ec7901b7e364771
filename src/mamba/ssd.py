"""The Mamba-2 state-space duality (SSD) scan in plain PyTorch: chunked for training and
prefill, one recurrent step for generation.

The selective SSM, per head ``h`` with state ``S`` of shape (head_dim, state_size)::

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T        y_t = S_t C_t + D_h * x_t

:func:`ssd_chunked` computes it for a whole sequence in chunks of ``Q`` positions: inside a
chunk as a masked, decay-weighted "attention" (a matmul), across chunks by carrying the
state from one chunk to the next. Time and memory are linear in the length: the biggest
intermediate is (batch, heads, L/Q, Q, Q), i.e. ``heads * Q`` numbers per token.

It computes the same function as ``transformers``' ``Mamba2Mixer`` torch path (tests check
it to 1e-4) but is organised for CPU speed: B and C are shared by all heads of a group and
are never repeated per head, the decay mask comes from one subtraction of cumulative sums
(no expand + cumsum over a Q x Q tensor), the carry across chunks is a linear loop
instead of a quadratic matrix over all chunk pairs, and the backward pass is written by
hand (:class:`_ChunkedScan`) from a few saved tensors. Measured in
``bench/mamba_throughput.py``: about 1.5-2x transformers' scan at the same chunk size and
3-4.5x at its default chunk size of 256, flat from L = 512 to 8192.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def fused_kernels() -> dict:
    """The CUDA kernels of ``mamba_ssm`` / ``causal_conv1d`` that are importable here, by name:
    ``mamba_chunk_scan_combined`` (the SSD scan, Triton) and ``causal_conv1d_fn``. Empty
    when the packages are not installed (as on CPU-only machines): MARK's own scan and
    convolution are used then. Only ever used on CUDA tensors."""
    kernels = {}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        kernels["mamba_chunk_scan_combined"] = mamba_chunk_scan_combined
    except Exception:  # not installed, or built for another torch/CUDA: MARK's scan serves
        pass
    try:
        from causal_conv1d import causal_conv1d_fn

        kernels["causal_conv1d_fn"] = causal_conv1d_fn
    except Exception:
        pass
    return kernels


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the selective SSM over whole sequences.

    Args:
        x: (batch, length, heads, head_dim) inputs.
        dt: (batch, length, heads) positive step sizes (softplus already applied).
        A: (heads,) negative decay rates.
        B, C: (batch, length, groups, state_size) input and output projections; each group
            serves ``heads // groups`` consecutive heads.
        chunk_size: positions per chunk (``Q``).
        D: (heads,) skip connection, or None.
        initial_state: (batch, heads, head_dim, state_size) state before the first token.
        return_final_state: also return the state after the last token.

    Returns:
        y of shape (batch, length, heads, head_dim) and, if asked, the final state
        (batch, heads, head_dim, state_size), in float32 (float64 for float64 inputs).
    """
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, B, C = x.to(dtype), dt.to(dtype), B.to(dtype), C.to(dtype)
    u = x * dt[..., None]
    log_decay = dt * A.to(dtype)
    pad = (-length) % chunk_size
    if pad:
        # Padded steps have dt = 0: no decay, no input, so they leave the state unchanged.
        u = F.pad(u, (0, 0, 0, 0, 0, pad))
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    chunks = (length + pad) // chunk_size
    shape = (batch, chunks, chunk_size)
    if initial_state is not None:
        initial_state = initial_state.to(dtype).contiguous()
    with torch.autocast(device_type=x.device.type, enabled=False):  # decays need full precision
        y, final_state = _ChunkedScan.apply(
            u.reshape(*shape, heads, head_dim),
            log_decay.reshape(*shape, heads),
            B.reshape(*shape, groups, state_size),
            C.reshape(*shape, groups, state_size),
            initial_state,
        )
    y = y.view(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    if D is not None:
        y = y + x * D.to(dtype)[:, None]
    if return_final_state:
        return y, final_state
    return y


class _ChunkedScan(torch.autograd.Function):
    """The SSD scan over chunked sequences with a hand-written backward.

    Shapes (b batch, c chunks, Q chunk length, h heads = g groups x hg heads per group,
    p head_dim, n state_size); sequence tensors stay in their natural (b, c, Q, ...) layout::

        u = x * dt      (b, c, Q, h, p)      log_decay a = dt * A   (b, c, Q, h)
        B, C            (b, c, Q, g, n)      initial state S0       (b, h, p, n) or None
        -> y            (b, c, Q, h, p)      final state            (b, h, p, n)

    With cum = cumsum(a) inside each chunk::

        y_l   = sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) u_s       (inside the chunk)
              + exp(cum_l) S_in C_l                                  (state carried in)
        S_out = exp(cum_last) S_in + sum_s exp(cum_last - cum_s) u_s B_s^T

    Autograd through the same expression stores every Q x Q intermediate, zero-fills the
    gradients of masked and broadcast tensors and reduces over inner dimensions, which
    dominates a CPU training step; this backward works from the few saved tensors below.
    """

    @staticmethod
    def forward(ctx, u, log_decay, B, C, initial_state):
        b, c, q, h, p = u.shape
        g, n = B.shape[3], B.shape[4]
        hg = h // g
        cum = torch.cumsum(log_decay, dim=2)  # (b, c, Q, h)
        cum_t = cum.permute(0, 1, 3, 2).contiguous()  # (b, c, h, Q)
        Bg = B.permute(0, 1, 3, 2, 4)  # (b, c, g, Q, n)
        Cg = C.permute(0, 1, 3, 2, 4)

        # Inside chunks: M = (C B^T) * exp(segment sums), lower triangular, per head.
        scores = torch.matmul(Cg, Bg.transpose(-1, -2))  # (b, c, g, Q, Q)
        causal = torch.ones(q, q, dtype=torch.bool, device=u.device).tril()
        decay = (cum_t[..., :, None] - cum_t[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()
        mixing = decay.view(b, c, g, hg, q, q) * scores[:, :, :, None]
        u_heads = u.permute(0, 1, 3, 2, 4).contiguous()  # (b, c, h, Q, p)
        y_inner = torch.matmul(mixing.view(b, c, h, q, q), u_heads)  # (b, c, h, Q, p)

        # Each chunk's own contribution to the state at its end.
        to_end = torch.exp(cum[:, :, -1:, :] - cum)  # (b, c, Q, h)
        u_to_end = _group_major(u * to_end[..., None], g)  # (b, c, g, Q, hg*p)
        chunk_states = torch.matmul(u_to_end.transpose(-1, -2), Bg)  # (b, c, g, hg*p, n)

        # Carry the state from chunk to chunk.
        chunk_decay = torch.exp(cum[:, :, -1, :])  # (b, c, h)
        states_in = u.new_empty(b, c, h, p, n)
        state = initial_state if initial_state is not None else u.new_zeros(b, h, p, n)
        chunk_states = chunk_states.view(b, c, h, p, n)
        for k in range(c):
            states_in[:, k] = state
            state = torch.addcmul(chunk_states[:, k], state, chunk_decay[:, k, :, None, None])

        # The carried-in state's output: exp(cum_l) * (S_in C_l).
        from_state = torch.matmul(Cg, states_in.view(b, c, g, hg * p, n).transpose(-1, -2))  # (b, c, g, Q, hg*p)
        y = _natural(from_state, h, p) * torch.exp(cum)[..., None]
        y += y_inner.permute(0, 1, 3, 2, 4)

        ctx.has_initial_state = initial_state is not None
        ctx.save_for_backward(u, cum, B, C, decay, scores, states_in)
        return y, state

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        u, cum, B, C, decay, scores, states_in = ctx.saved_tensors
        b, c, q, h, p = u.shape
        g, n = B.shape[3], B.shape[4]
        hg = h // g
        Bg = B.permute(0, 1, 3, 2, 4)
        Cg = C.permute(0, 1, 3, 2, 4)
        grad_y = grad_y.contiguous()
        exp_cum = torch.exp(cum)

        # Output of the carried-in state: y_l += exp(cum_l) P_l with P = C S_in^T.
        states_g = states_in.view(b, c, g, hg * p, n)
        from_state = _natural(torch.matmul(Cg, states_g.transpose(-1, -2)), h, p)
        grad_p = grad_y * exp_cum[..., None]  # (b, c, Q, h, p)
        grad_cum = (grad_p * from_state).sum(-1)  # (b, c, Q, h)
        grad_p_g = _group_major(grad_p, g)  # (b, c, g, Q, hg*p)
        grad_C = torch.matmul(grad_p_g, states_g)  # (b, c, g, Q, n)
        grad_states_in = torch.matmul(grad_p_g.transpose(-1, -2), Cg).view(b, c, h, p, n)

        # Back through the chunk-to-chunk carry.
        chunk_decay = torch.exp(cum[:, :, -1, :])
        grad_chunk_states = torch.empty_like(states_in)
        grad_state = grad_final if grad_final is not None else u.new_zeros(b, h, p, n)
        for k in range(c - 1, -1, -1):
            grad_chunk_states[:, k] = grad_state
            grad_state = torch.addcmul(grad_states_in[:, k], grad_state, chunk_decay[:, k, :, None, None])
        grad_initial = grad_state if ctx.has_initial_state else None
        grad_last = (grad_chunk_states * states_in).view(b, c, h, p * n).sum(-1) * chunk_decay  # (b, c, h)

        # Each chunk's contribution to its end state: S_c = (u * to_end)^T B.
        to_end = torch.exp(cum[:, :, -1:, :] - cum)
        grad_cs_g = grad_chunk_states.view(b, c, g, hg * p, n)
        grad_u_to_end = _natural(torch.matmul(Bg, grad_cs_g.transpose(-1, -2)), h, p)  # (b, c, Q, h, p)
        grad_B = torch.matmul(_group_major(u * to_end[..., None], g), grad_cs_g)  # (b, c, g, Q, n)
        grad_u = grad_u_to_end * to_end[..., None]
        grad_to_end = (grad_u_to_end * u).sum(-1) * to_end  # (b, c, Q, h)
        grad_cum -= grad_to_end
        grad_last += grad_to_end.sum(2)

        # Inside chunks: y_inner = M u with M = scores * decay.
        u_heads = u.permute(0, 1, 3, 2, 4).contiguous()
        grad_y_heads = grad_y.permute(0, 1, 3, 2, 4).contiguous()  # (b, c, h, Q, p)
        mixing = (decay.view(b, c, g, hg, q, q) * scores[:, :, :, None]).view(b, c, h, q, q)
        grad_mixing = torch.matmul(grad_y_heads, u_heads.transpose(-1, -2))  # (b, c, h, Q, Q)
        grad_u += torch.matmul(mixing.transpose(-1, -2), grad_y_heads).permute(0, 1, 3, 2, 4)
        weighted = (grad_mixing * decay).view(b, c, g, hg, q, q)
        grad_scores = weighted[:, :, :, 0].clone()
        for i in range(1, hg):
            grad_scores += weighted[:, :, :, i]
        grad_C += torch.matmul(grad_scores, Bg)
        grad_B += torch.matmul(grad_scores.transpose(-1, -2), Cg)
        grad_segment = grad_mixing.mul_(mixing)  # d/d(cum_l - cum_s); zero above the diagonal
        grad_cum_t = grad_segment.sum(-1) - grad_segment.transpose(-1, -2).sum(-1)  # (b, c, h, Q)
        grad_cum += grad_cum_t.permute(0, 1, 3, 2)
        grad_cum[:, :, -1, :] += grad_last

        # cum = cumsum(a): the gradient of a_j is the sum of grad_cum over l >= j.
        grad_log_decay = grad_cum.flip(2).cumsum(2).flip(2)
        grad_B = grad_B.permute(0, 1, 3, 2, 4)
        grad_C = grad_C.permute(0, 1, 3, 2, 4)
        return grad_u, grad_log_decay, grad_B, grad_C, grad_initial


def _group_major(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, c, Q, h, p) -> (b, c, g, Q, hg*p): the heads of a group side by side."""
    b, c, q, h, p = t.shape
    return t.reshape(b, c, q, groups, (h // groups) * p).transpose(2, 3)


def _natural(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(b, c, g, Q, hg*p) -> (b, c, Q, h, p), inverse of :func:`_group_major`."""
    b, c, g, q, _ = t.shape
    return t.transpose(2, 3).contiguous().view(b, c, q, heads, head_dim)


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step of the selective SSM (generation): cost independent of the past.

    Args:
        state: (batch, heads, head_dim, state_size).
        x: (batch, heads, head_dim); dt: (batch, heads), softplus applied; A: (heads,).
        B, C: (batch, groups, state_size); D: (heads,) or None.

    Returns:
        (y of shape (batch, heads, head_dim), the new state), float32.
    """
    heads = x.shape[1]
    per_group = heads // B.shape[1]
    x, dt = x.float(), dt.float()
    B = B.float().repeat_interleave(per_group, dim=1)  # (b, h, n)
    C = C.float().repeat_interleave(per_group, dim=1)
    decay = torch.exp(dt * A.float())[..., None, None]
    state = state.float() * decay + (x * dt[..., None])[..., :, None] * B[..., None, :]
    y = torch.matmul(state, C[..., None]).squeeze(-1)
    if D is not None:
        y = y + x * D.float()[:, None]
    return y, state
