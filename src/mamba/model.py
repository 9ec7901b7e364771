"""MARK's Mamba-2 language model: embeddings, a stack of SSD mixer blocks, a language-model head.

No attention anywhere: each block mixes along the sequence with a causal depthwise
convolution and the selective state-space scan of :mod:`src.mamba.ssd`.

The parameter names and shapes are exactly those of ``transformers``' ``Mamba2ForCausalLM``
(``backbone.embeddings``, ``backbone.layers.N.mixer.in_proj`` ...), so a MARK state dict loads
into the Hugging Face model (``to_hf_config`` gives its config) and the other way round;
``tests/mamba/test_model.py`` checks both compute the same logits.

A model runs two ways:
* :meth:`MambaLM.forward` over whole sequences (training, scoring, prompt prefill), optionally
  starting from and returning a :class:`MambaCache`;
* :meth:`MambaLM.step` one token at a time from a cache (generation): the cost of a step
  does not depend on how many tokens came before.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from src.mamba.loss import linear_cross_entropy
from src.mamba.ssd import fused_kernels, ssd_chunked


# What a LoRA adapter (src/training/adapters.py) cannot reach in this model; in_proj and
# out_proj it can (their forward is called as a module, in training and in the decoding step).
ADAPTER_REFUSED_TARGETS = {
    "conv1d": "the mixer reads the depthwise convolution's kernel directly, so LoRA cannot reach it",
    "lm_head": "the training loss reads lm_head.weight directly (chunked cross-entropy) and it may be tied to the embeddings",
}


@dataclass
class MambaArgs:
    """Architecture of a :class:`MambaLM` (stored in every checkpoint as a plain dict)."""

    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    state_size: int = 64
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MambaArgs":
        return cls(**values)


def to_hf_config(args: MambaArgs):
    """The ``transformers.Mamba2Config`` of the same architecture (for ``Mamba2ForCausalLM``)."""
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.d_model,
        num_hidden_layers=args.n_layers,
        num_heads=args.n_heads,
        head_dim=args.head_dim,
        state_size=args.state_size,
        expand=args.expand,
        n_groups=args.n_groups,
        conv_kernel=args.conv_kernel,
        chunk_size=args.chunk_size,
        tie_word_embeddings=args.tie_embeddings,
        layer_norm_epsilon=args.norm_eps,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=True,
        pad_token_id=args.pad_token_id,
        bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
    )


def _matvec(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T`` for the decoding step's few rows; with ``weight_t`` (``weight.t()``
    made contiguous, see :meth:`MambaLM.transposed_weights`) the CPU's GEMM streams the
    weights in their (in, out) layout, which for 1-16 rows is about 2x faster than the
    (out, in) layout of ``F.linear`` when all 12 MB of the spec model's matrices are read per
    token (measured on this box: 300 vs 600 us per step at batch 1, 1 thread)."""
    if weight_t is not None:
        return torch.mm(x, weight_t)
    return F.linear(x, weight)


def _project(module: nn.Module, x: torch.Tensor, weight_t: torch.Tensor | None) -> torch.Tensor:
    """A projection of the decoding step: :func:`_matvec` for a plain ``nn.Linear``; a layer
    wrapped by a LoRA adapter (:mod:`src.training.adapters`) runs its own forward, so the
    adapter is applied (its weight is only the frozen base)."""
    if weight_t is None and not isinstance(module, nn.Linear):
        return module(x)
    return _matvec(x, module.weight, weight_t)


@dataclass
class MambaCache:
    """Recurrent state of every layer after some tokens: what generation carries forward.

    ``conv[i]``: (batch, conv_dim, conv_kernel - 1), the last inputs of layer i's convolution;
    ``ssm[i]``: (batch, heads, head_dim, state_size), its SSM state. Its size is fixed: it does
    not grow with the number of tokens seen.
    """

    conv: list[torch.Tensor] = field(default_factory=list)
    ssm: list[torch.Tensor] = field(default_factory=list)

    @staticmethod
    def concat(caches: list["MambaCache"]) -> "MambaCache":
        """Stack the caches of single sequences into one batch."""
        layers = len(caches[0].conv)
        return MambaCache(
            conv=[torch.cat([c.conv[i] for c in caches]) for i in range(layers)],
            ssm=[torch.cat([c.ssm[i] for c in caches]) for i in range(layers)],
        )

    def select(self, index: torch.Tensor) -> "MambaCache":
        """The cache of the batch rows in ``index``."""
        return MambaCache(conv=[c[index] for c in self.conv], ssm=[s[index] for s in self.ssm])


@dataclass
class MambaOutput:
    """``logits`` (batch, length, vocab) or None when not computed; ``hidden_states`` the
    backbone's final, normed hidden states (batch, length, d_model), e.g. for a value or
    reward head; ``loss`` when labels were given; ``cache`` when asked for."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    loss: torch.Tensor | None = None
    cache: MambaCache | None = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` per group of channels (Mamba-2's output norm)."""

    def __init__(self, size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        shape = y.shape
        y = y.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.view(shape).to(dtype)


class _CausalDepthwiseConv(torch.autograd.Function):
    """Forward and backward of :func:`causal_depthwise_conv` as ``kernel`` shifted
    multiply-adds each, accumulated in place (autograd's version zero-fills a full-size
    gradient for every tap)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        kernel = taps.shape[0]
        length = padded.shape[1] - kernel + 1
        out = padded[:, kernel - 1 :] * taps[kernel - 1] + bias
        for j in range(kernel - 1):
            out.addcmul_(padded[:, j : j + length], taps[j])
        ctx.save_for_backward(padded, taps)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        padded, taps = ctx.saved_tensors
        kernel = taps.shape[0]
        length = grad_out.shape[1]
        channels = taps.shape[1]
        grad_out = grad_out.contiguous()
        grad_padded = torch.zeros_like(padded)
        grad_taps = torch.empty_like(taps)
        for j in range(kernel):
            grad_padded[:, j : j + length].addcmul_(grad_out, taps[j])
            # (reduce over a flat contiguous view: much faster than .sum((0, 1)) on CPU)
            grad_taps[j] = (grad_out * padded[:, j : j + length]).view(-1, channels).sum(0)
        return grad_padded, grad_taps, grad_out.view(-1, channels).sum(0)


def causal_depthwise_conv(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution along time, channels last.

    ``padded``: (batch, kernel - 1 + length, channels), the inputs preceded by ``kernel - 1``
    steps of history; ``weight``: (channels, 1, kernel) and ``bias`` (channels,) as in
    ``nn.Conv1d``. Returns (batch, length, channels). Written as shifted multiply-adds:
    channels-last needs no transposes, and the CPU backward of a grouped ``conv1d`` is slow.
    """
    taps = weight.squeeze(1).t().contiguous()  # (kernel, channels)
    return _CausalDepthwiseConv.apply(padded, taps, bias)


class Mamba2Mixer(nn.Module):
    """in_proj -> causal depthwise conv on (x, B, C) -> selective SSM -> gated norm -> out_proj."""

    def __init__(self, args: MambaArgs) -> None:
        super().__init__()
        self.args = args
        d_inner, n_heads = args.d_inner, args.n_heads
        self.d_inner = d_inner
        self.bc_size = args.n_groups * args.state_size
        self.conv_dim = d_inner + 2 * self.bc_size
        self.in_proj = nn.Linear(args.d_model, d_inner + self.conv_dim + n_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, args.conv_kernel, groups=self.conv_dim,
            padding=args.conv_kernel - 1, bias=True,
        )
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(d_inner, d_inner // args.n_groups, args.norm_eps)
        self.out_proj = nn.Linear(d_inner, args.d_model, bias=False)
        # On CUDA, mamba_ssm's fused kernels when importable (src.mamba.ssd.fused_kernels);
        # False forces MARK's own scan (the parity tests compare the two).
        self.use_fused_kernels = True

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba-2's initialisation: A_h = h (decay rates 1..heads), D = 1, dt log-uniform."""
        n_heads = self.args.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, n_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _split(self, projected: torch.Tensor):
        return projected.split([self.d_inner, self.conv_dim, self.args.n_heads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor):
        return xbc.split([self.d_inner, self.bc_size, self.bc_size], dim=-1)

    def forward(
        self,
        hidden: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        return_state: bool = False,
    ):
        """(batch, length, d_model) -> same shape; with ``return_state`` also the new
        (conv_state, ssm_state). Given states continue a sequence from where they were taken."""
        args = self.args
        batch, length, _ = hidden.shape
        z, xbc, dt = self._split(self.in_proj(hidden))

        kernel = args.conv_kernel
        kernels = fused_kernels() if hidden.is_cuda and self.use_fused_kernels else {}
        if conv_state is None:
            padded = F.pad(xbc, (0, 0, kernel - 1, 0))  # (b, kernel - 1 + L, conv_dim)
        else:
            padded = torch.cat([conv_state.transpose(1, 2).to(xbc.dtype), xbc], dim=1)
        if "causal_conv1d_fn" in kernels and conv_state is None:
            conv = kernels["causal_conv1d_fn"](
                xbc.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu"
            )
            xbc = conv.transpose(1, 2)
        else:
            xbc = F.silu(causal_depthwise_conv(padded, self.conv1d.weight, self.conv1d.bias))

        x, B, C = self._split_xbc(xbc)
        A = -torch.exp(self.A_log.float())
        if "mamba_chunk_scan_combined" in kernels:
            # mamba_ssm's fused SSD scan (softplus, decays and state in fp32 inside the kernel).
            scan = kernels["mamba_chunk_scan_combined"](
                x.reshape(batch, length, args.n_heads, args.head_dim),
                dt,
                A,
                B.reshape(batch, length, args.n_groups, args.state_size),
                C.reshape(batch, length, args.n_groups, args.state_size),
                args.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                initial_states=ssm_state,
                dt_softplus=True,
                return_final_states=return_state,
            )
            y, final_state = scan if return_state else (scan, None)
            if final_state is not None:
                final_state = final_state.float()
            return self._finish(hidden, y, z, padded, final_state, return_state)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        scan = ssd_chunked(
            x.reshape(batch, length, args.n_heads, args.head_dim),
            dt,
            A,
            B.reshape(batch, length, args.n_groups, args.state_size),
            C.reshape(batch, length, args.n_groups, args.state_size),
            args.chunk_size,
            D=self.D,
            initial_state=ssm_state,
            return_final_state=return_state,
        )
        y, final_state = scan if return_state else (scan, None)
        return self._finish(hidden, y, z, padded, final_state, return_state)

    def _finish(self, hidden, y, z, padded, final_state, return_state):
        """Gated norm and output projection of the scan's ``y``; the states when asked."""
        batch, length = hidden.shape[:2]
        y = self.norm(y.reshape(batch, length, self.d_inner), z)
        out = self.out_proj(y.to(hidden.dtype))
        if return_state:
            kernel = self.args.conv_kernel
            conv_state = padded[:, padded.shape[1] - (kernel - 1):].transpose(1, 2).detach()
            return out, (conv_state, final_state.detach())
        return out

    def step_(
        self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
        in_proj_t: torch.Tensor | None = None, out_proj_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token, fused: (batch, d_model) -> (batch, d_model), updating ``conv_state``
        (batch, conv_dim, kernel - 1) and ``ssm_state`` (batch, heads, head_dim, state_size,
        float32, contiguous) in place. ``in_proj_t``/``out_proj_t``: the projections'
        transposed copies (:meth:`MambaLM.transposed_weights`), read instead of the weights.

        About 20 kernels per layer and no Python objects per token: B and C are shared by
        the heads of a group, so the state update is one batched outer product
        (``baddbmm_``) and the readout one ``bmm`` over (heads_per_group * head_dim) rows.
        """
        args = self.args
        batch = hidden.shape[0]
        groups, heads, head_dim, state = args.n_groups, args.n_heads, args.head_dim, args.state_size
        rows = heads // groups * head_dim
        z, xbc, dt = self._split(_project(self.in_proj, hidden, in_proj_t))
        window = torch.cat([conv_state, xbc.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (b, conv_dim, kernel)
        conv_state.copy_(window[..., 1:])
        xbc = F.silu((window * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias)
        x, B, C = self._split_xbc(xbc.float())
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, heads)
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))
        x = x.reshape(batch, heads, head_dim)
        if torch.compiler.is_compiling():
            # Compiled: the update and the readout as broadcasts, which inductor fuses into
            # one loop over the state that writes it in place (an extern baddbmm/bmm would
            # need a state-sized temporary and a copy back per layer).
            per_head = (batch, groups, heads // groups, 1, state)
            B = B.view(batch, groups, 1, 1, state).expand(per_head).reshape(batch, heads, 1, state)
            C = C.view(batch, groups, 1, 1, state).expand(per_head).reshape(batch, heads, 1, state)
            new_state = ssm_state * decay[..., None, None] + (x * dt[..., None])[..., None] * B
            ssm_state.copy_(new_state)
            y = (new_state * C).sum(-1)
        else:
            ssm_state.mul_(decay[..., None, None])
            flat_state = ssm_state.view(batch * groups, rows, state)
            flat_state.baddbmm_((x * dt[..., None]).reshape(batch * groups, rows, 1), B.reshape(batch * groups, 1, state))
            y = torch.bmm(flat_state, C.reshape(batch * groups, state, 1)).view(batch, heads, head_dim)
        y = torch.addcmul(y, x, self.D.float()[:, None]).view(batch, self.d_inner) * F.silu(z.float())
        norm = self.norm
        if groups == 1:
            y = F.rms_norm(y, (self.d_inner,), norm.weight.float(), norm.eps)
        else:
            y = F.rms_norm(y.view(batch, groups, norm.group_size), (norm.group_size,), None, norm.eps)
            y = y.view(batch, self.d_inner) * norm.weight.float()
        return _project(self.out_proj, y.to(hidden.dtype), out_proj_t)


class MambaBlock(nn.Module):
    """Pre-norm residual block around a :class:`Mamba2Mixer`; the residual stream is float32."""

    def __init__(self, args: MambaArgs) -> None:
        super().__init__()
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.mixer = Mamba2Mixer(args)

    def forward(self, hidden, conv_state=None, ssm_state=None, return_state=False):
        mixed = self.mixer(self.norm(hidden), conv_state, ssm_state, return_state)
        if return_state:
            mixed, state = mixed
            return hidden.float() + mixed, state
        return hidden.float() + mixed

    def step_(self, hidden, conv_state, ssm_state, in_proj_t=None, out_proj_t=None):
        """One token (batch, d_model) float32 -> same; states updated in place."""
        normed = F.rms_norm(hidden, (hidden.shape[-1],), self.norm.weight.float(), self.norm.eps)
        mixed = self.mixer.step_(normed.to(self.mixer.in_proj.weight.dtype), conv_state, ssm_state, in_proj_t, out_proj_t)
        return hidden + mixed


class MambaBackbone(nn.Module):
    def __init__(self, args: MambaArgs) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(MambaBlock(args) for _ in range(args.n_layers))
        self.norm_f = RMSNorm(args.d_model, args.norm_eps)


class MambaLM(nn.Module):
    """Mamba-2 causal language model. See the module docstring for the two ways to run it."""

    def __init__(self, args: MambaArgs, gradient_checkpointing: bool = False, compile: bool = False) -> None:
        """``compile``: run each block through ``torch.compile`` (``model.compile`` in the
        config); parameter names and checkpoints are unchanged, the first step compiles."""
        super().__init__()
        if args.d_inner % args.n_heads or args.n_heads % args.n_groups:
            raise ValueError("expand * d_model must divide into n_heads, and n_heads into n_groups")
        self.args = args
        self.gradient_checkpointing = gradient_checkpointing
        self.backbone = MambaBackbone(args)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.reset_parameters()
        if args.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        if compile:
            self.compile_blocks()

    def compile_blocks(self) -> None:
        """Run each block through ``torch.compile`` (``model.compile``); the first step compiles."""
        # Per block (not the whole model): one graph serves every layer, and the
        # chunked loss stays outside the graph. nn.Module.compile keeps the state-dict keys.
        for block in self.backbone.layers:
            block.compile()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation of the reference Mamba: small embeddings, default linear/conv init,
        output projections scaled by 1/sqrt(layers) so the residual stream starts small."""
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        for block in self.backbone.layers:
            block.mixer.reset_ssm_parameters()
            block.mixer.out_proj.weight /= math.sqrt(self.args.n_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: MambaCache | None = None,
        return_cache: bool = False,
        compute_logits: bool = True,
    ) -> MambaOutput:
        """Run whole sequences (batch, length) of token ids.

        ``labels`` (batch, length; -100 = no label) gives ``loss``, the mean cross-entropy of
        the labelled positions, computed without materialising the logits (``logits`` is then
        None). ``cache`` continues the sequences from an earlier call's state; ``return_cache``
        returns the state after the last token. Right padding is harmless: outputs at a
        position never depend on later positions. ``compute_logits=False`` skips the LM head
        (hidden states only).
        """
        hidden = self.backbone.embeddings(input_ids)
        new_cache = MambaCache() if return_cache else None
        for i, block in enumerate(self.backbone.layers):
            conv_state = cache.conv[i] if cache is not None else None
            ssm_state = cache.ssm[i] if cache is not None else None
            if return_cache:
                hidden, (conv_state, ssm_state) = block(hidden, conv_state, ssm_state, True)
                new_cache.conv.append(conv_state)
                new_cache.ssm.append(ssm_state)
            elif self.gradient_checkpointing and self.training:
                hidden = checkpoint(block, hidden, conv_state, ssm_state, use_reentrant=False)
            else:
                hidden = block(hidden, conv_state, ssm_state)
        hidden = self.backbone.norm_f(hidden)
        if labels is not None:
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, labels.reshape(-1))
            return MambaOutput(logits=None, hidden_states=hidden, loss=loss, cache=new_cache)
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float() if compute_logits else None
        return MambaOutput(logits=logits, hidden_states=hidden, cache=new_cache)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: MambaCache) -> tuple[torch.Tensor, MambaCache]:
        """Feed one token per sequence (batch,) after ``cache``; returns (logits (batch, vocab),
        new cache). ``cache`` is left unchanged (it is copied); :meth:`step_` is the same
        step without the copy, for decoding loops that own their cache."""
        new_cache = MambaCache(
            conv=[c.clone(memory_format=torch.contiguous_format) for c in cache.conv],
            ssm=[s.float().clone(memory_format=torch.contiguous_format) for s in cache.ssm],
        )
        return self.step_(token_ids, new_cache), new_cache

    @torch.no_grad()
    def transposed_weights(self) -> list[torch.Tensor]:
        """Contiguous transposed copies of the matrices the decoding step multiplies by
        (in_proj and out_proj of each layer, then the LM head), for ``step_(...,
        transposed=...)``: about 2x faster matrix-vector products on the CPU (see
        ``_matvec``). They are copies: take them again after the weights change. A model with
        an unmerged adapter has none (its projections are not single matrices)."""
        if self.has_adapter():
            raise ValueError("transposed_weights: the model has an unmerged LoRA adapter (merge it first)")
        weights = []
        for block in self.backbone.layers:
            weights += [block.mixer.in_proj.weight.t().contiguous(), block.mixer.out_proj.weight.t().contiguous()]
        return weights + [self.lm_head.weight.t().contiguous()]

    @torch.no_grad()
    def step_(self, token_ids: torch.Tensor, cache: MambaCache, transposed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Feed one token per sequence (batch,), updating ``cache`` in place; returns the
        logits (batch, vocab) in float32. The cache's SSM states must be contiguous float32
        (as :meth:`forward` and :meth:`MambaCache.concat` make them). This is the decoding
        hot path: a fixed sequence of kernels with no Python objects created per layer, which
        ``torch.compile`` can turn into a few fused loops (see ``src.mamba.generate.Decoder``).
        ``transposed``: :meth:`transposed_weights`, multiplied by instead of the matrices."""
        hidden = self.backbone.embeddings(token_ids).float()
        for i, block in enumerate(self.backbone.layers):
            if transposed is None:
                hidden = block.step_(hidden, cache.conv[i], cache.ssm[i])
            else:
                hidden = block.step_(hidden, cache.conv[i], cache.ssm[i], transposed[2 * i], transposed[2 * i + 1])
        norm_f = self.backbone.norm_f
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), norm_f.weight.float(), norm_f.eps)
        lm_head_t = transposed[-1] if transposed is not None else None
        return _matvec(hidden.to(self.lm_head.weight.dtype), self.lm_head.weight, lm_head_t).float()

    def empty_cache(self, batch_size: int, device: torch.device | str | None = None) -> MambaCache:
        """The state before any token: zeros, contiguous, SSM state in float32."""
        args = self.args
        device = device if device is not None else self.lm_head.weight.device
        conv_dim = args.d_inner + 2 * args.n_groups * args.state_size
        dtype = self.lm_head.weight.dtype
        return MambaCache(
            conv=[torch.zeros(batch_size, conv_dim, args.conv_kernel - 1, device=device, dtype=dtype) for _ in range(args.n_layers)],
            ssm=[torch.zeros(batch_size, args.n_heads, args.head_dim, args.state_size, device=device) for _ in range(args.n_layers)],
        )

    def has_adapter(self) -> bool:
        """Whether a LoRA adapter (:mod:`src.training.adapters`) is injected and not merged."""
        return any(not isinstance(b.mixer.in_proj, nn.Linear) or not isinstance(b.mixer.out_proj, nn.Linear)
                   for b in self.backbone.layers)

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())
