"""MARK's native CPU decoding kernel (src/mamba/native.py, src/mamba/kernels/decode_cpu.c):
the eager step's numbers, the same greedy tokens, exact across threads and batch mates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.mamba import native
from src.mamba.generate import Decoder, generate_ids
from src.mamba.model import MambaArgs, MambaCache, MambaLM

REPO = Path(__file__).resolve().parents[2]
ok, why = native.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"the native kernel cannot be built here: {why}")

# Odd sizes on purpose: d_model and vocab not multiples of a tile, groups > 1, other kernels.
SHAPES = [
    dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=16),
    dict(vocab_size=261, d_model=40, n_layers=3, n_heads=4, n_groups=2, state_size=12, conv_kernel=3, chunk_size=8),
    dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=8, state_size=16, conv_kernel=4, chunk_size=16),
]


def make_model(shape: dict, seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(MambaArgs(**shape)).eval()
    with torch.no_grad():  # per-head decays, skips and conv biases unlike the init values
        for block in model.backbone.layers:
            for param in (block.mixer.A_log, block.mixer.D, block.mixer.dt_bias, block.mixer.conv1d.bias, block.norm.weight):
                param.add_(torch.randn_like(param) * 0.3)
    return model


def prefilled(model: MambaLM, prompts: list[list[int]]):
    with torch.inference_mode():
        starts = [model(torch.tensor([p]), return_cache=True) for p in prompts]
    cache = MambaCache.concat([s.cache for s in starts])
    return cache, torch.cat([s.logits[:, -1] for s in starts]).argmax(-1)


@pytest.mark.parametrize("shape", SHAPES, ids=["tiny", "groups2-kernel3", "vocab1000"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_step_gives_the_eager_logits_and_states(shape, threads):
    """20 steps of a batch of 3: logits and both states equal ``MambaLM.step_``'s to float32
    rounding (only the order of additions differs), and the argmax agrees every step."""
    model = make_model(shape)
    step = native.NativeStep(model, threads=threads)
    prompts = [[1, 5, 9, 11], [1, 20, 30], [1, 7, 8, 9, 10, 11]]
    mine, _ = prefilled(model, prompts)
    ref, token = prefilled(model, prompts)
    with torch.inference_mode():
        for _ in range(20):
            expected = model.step_(token, ref)
            got = step.step(token, mine)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            token = expected.argmax(-1)
    for a, b in zip(mine.ssm + mine.conv, ref.ssm + ref.conv):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (ref.ssm[0].abs() > 0).float().mean() > 0.9  # the states really were exercised


def test_native_greedy_tokens_equal_the_eager_ones_and_are_exact_across_threads_and_batches():
    """``greedy`` (all steps in one call): the eager step's 40 tokens. Its arithmetic per row
    does not depend on the thread count or on the other rows of the batch: the tokens and
    states are bitwise the same with 1 or 2 threads, and a row decoded alone or in a batch."""
    model = make_model(SHAPES[2])
    prompts = [[1, 5, 9, 11], [1, 20, 30], [1, 7, 8, 9, 10, 11]]
    cache, first = prefilled(model, prompts)
    eager_cache, _ = prefilled(model, prompts)
    eager = Decoder(model).greedy(first, eager_cache, 40)
    runs = {}
    for threads in (1, 2):
        c, _ = prefilled(model, prompts)
        runs[threads] = (native.NativeStep(model, threads=threads).greedy(first, c, 40), c)
    assert torch.equal(runs[1][0], eager)
    assert torch.equal(runs[1][0], runs[2][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[1][1].ssm + runs[1][1].conv, runs[2][1].ssm + runs[2][1].conv))
    alone, first_alone = prefilled(model, prompts[1:2])
    row = native.NativeStep(model, threads=2).greedy(first_alone, alone, 40)
    assert torch.equal(row[0], runs[2][0][1])
    assert torch.equal(alone.ssm[-1][0], runs[2][1].ssm[-1][1])


def test_native_decoder_through_generate_ids_with_eos_and_sampling():
    """``generate_ids`` with a native Decoder: greedy gives the eager tokens (cut after
    ``eos_id``, any ``max_new_tokens``); sampled with a seed, the same text twice."""
    model = make_model(SHAPES[0])
    decoder = Decoder(model, "native")
    assert decoder.backend == "native" and decoder.fused_greedy and not decoder.compiled
    prompts = [[1, 5, 9], [1, 20, 30, 40], [1, 7]]
    plain = generate_ids(model, prompts, max_new_tokens=30, temperature=0)
    assert generate_ids(model, prompts, max_new_tokens=30, temperature=0, decoder=decoder) == plain
    eos = plain[1][4]
    for max_new in (1, 5, 9, 30):
        expected = generate_ids(model, prompts, max_new_tokens=max_new, temperature=0, eos_id=eos)
        assert generate_ids(model, prompts, max_new_tokens=max_new, temperature=0, eos_id=eos, decoder=decoder) == expected
    a = generate_ids(model, prompts, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3, decoder=decoder)
    assert a == generate_ids(model, prompts, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3, decoder=decoder)
    assert [len(x) for x in a] == [20, 20, 20]


def test_auto_backend_and_what_the_kernel_refuses():
    """``auto`` picks the kernel for a float32 CPU model and the eager step for a bfloat16
    one (``supports`` says why); bad token ids and a non-contiguous state are errors, not
    memory corruption; an unknown backend names the choices."""
    model = make_model(SHAPES[0])
    assert Decoder(model, "auto").backend == "native"
    half = make_model(SHAPES[0]).to(torch.bfloat16)
    assert "float32" in native.supports(half)
    assert Decoder(half, "auto").backend == "eager"
    with pytest.raises(ValueError, match="float32"):
        Decoder(half, "native")
    step = native.NativeStep(model)
    cache = model.empty_cache(2)
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        step.step(torch.tensor([1, 300]), cache)
    with pytest.raises(ValueError, match="contiguous"):
        step.step(torch.tensor([1, 2]), MambaCache(conv=[c.transpose(1, 2).contiguous().transpose(1, 2) for c in cache.conv], ssm=cache.ssm))
    with pytest.raises(ValueError, match="rows"):
        step.step(torch.tensor([1, 2, 3]), cache)
    with pytest.raises(ValueError, match="eager, compile, native, auto"):
        Decoder(model, "fast")


def test_the_library_is_built_once_and_a_broken_compiler_falls_back_to_eager(tmp_path):
    """The build is cached under ``$MARK_CACHE_DIR`` (one .so, reused by the next process);
    without a working compiler ``available()`` says why and ``auto`` decodes eagerly."""
    code = (
        "import torch; from src.mamba import native; from src.mamba.generate import Decoder; "
        "from src.mamba.model import MambaArgs, MambaLM; ok, why = native.available(); "
        "m = MambaLM(MambaArgs(vocab_size=50, d_model=16, n_layers=1, n_heads=2, state_size=4)); "
        "print(ok, Decoder(m, 'auto').backend, why[:60].replace(' ', '_'))"
    )
    env = {**os.environ, "MARK_CACHE_DIR": str(tmp_path / "cache")}
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], cwd=REPO, env={**env, **extra}, capture_output=True, text=True, timeout=120,
    )
    first = run({})
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[:2] == ["True", "native"]
    built = list((tmp_path / "cache").glob("mark_decode_cpu_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert run({}).stdout.split()[:2] == ["True", "native"]
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    broken = run({"CC": "false", "MARK_CACHE_DIR": str(tmp_path / "other")})
    assert broken.returncode == 0, broken.stderr
    ok_flag, backend, why = broken.stdout.split()
    assert (ok_flag, backend) == ("False", "eager") and "failed" in why
