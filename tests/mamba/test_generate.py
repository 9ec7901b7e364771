"""Generation with the recurrent state, sampling and scoring (src/mamba/generate.py)."""

import pytest
import torch

from src.mamba import native
from src.mamba.generate import Decoder, default_decoder, generate, generate_ids, sample_next, token_logprobs
from src.mamba.model import MambaArgs, MambaCache, MambaLM
from src.mamba.tokenizer import MambaTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM(MambaArgs(vocab_size=300, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=16)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return MambaTokenizer.train(["a few words of text to learn some merges from, again and again"] * 20, vocab_size=300)


def test_same_seed_same_text_other_seed_other_text(model, tokenizer):
    a = generate(model, tokenizer, "a few", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=1)
    b = generate(model, tokenizer, "a few", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=1)
    c = generate(model, tokenizer, "a few", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=2)
    assert a == b and a != c
    assert isinstance(a, str)


def test_greedy_continuation_equals_argmax_of_full_forward(model):
    prompt = [1, 17, 45, 99, 3]
    new = generate_ids(model, [prompt], max_new_tokens=8, temperature=0)[0]
    assert len(new) == 8
    seq = list(prompt)
    with torch.no_grad():
        for token in new:  # recompute each step from scratch, without any state
            assert model(torch.tensor([seq])).logits[0, -1].argmax().item() == token
            seq.append(token)


def test_decoding_uses_one_token_steps_on_a_fixed_size_state(model, monkeypatch):
    """The cost of a new token does not depend on the prompt: after one prefill per prompt,
    every step feeds one token per sequence and the state has the same size for any prompt."""
    calls = {"forward_lengths": [], "step_shapes": [], "state_numel": []}
    forward, step = MambaLM.forward, MambaLM.step_

    def counting_forward(self, input_ids, *args, **kwargs):
        calls["forward_lengths"].append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    def counting_step(self, token_ids, cache):
        calls["step_shapes"].append(tuple(token_ids.shape))
        calls["state_numel"].append(sum(t.numel() for t in cache.conv + cache.ssm))
        return step(self, token_ids, cache)

    monkeypatch.setattr(MambaLM, "forward", counting_forward)
    monkeypatch.setattr(MambaLM, "step_", counting_step)
    eager = Decoder(model, "eager")
    short, long = [1] * 5, [1, 2, 3] * 400
    generate_ids(model, [short, long, short], max_new_tokens=6, temperature=0, decoder=eager)
    assert calls["forward_lengths"] == [5, 1200]  # one prefill per distinct prompt, nothing re-read
    assert calls["step_shapes"] == [(3,)] * 5  # then one token per sequence per step
    assert len(set(calls["state_numel"])) == 1

    calls["state_numel"].clear()
    generate_ids(model, [short], max_new_tokens=3, temperature=0, decoder=eager)
    short_state = calls["state_numel"][0]
    calls["state_numel"].clear()
    generate_ids(model, [long], max_new_tokens=3, temperature=0, decoder=eager)
    assert calls["state_numel"][0] == short_state


def test_batched_prompts_of_different_lengths_match_single_runs(model):
    prompts = [[1, 5, 9], [1, 20, 30, 40, 50, 60, 70]]
    together = generate_ids(model, prompts, max_new_tokens=6, temperature=0.8, seed=3)
    assert [len(x) for x in together] == [6, 6]
    greedy_together = generate_ids(model, prompts, max_new_tokens=6, temperature=0)
    for prompt, out in zip(prompts, greedy_together):
        assert generate_ids(model, [prompt], max_new_tokens=6, temperature=0)[0] == out


def test_generation_stops_at_eos(model):
    first = generate_ids(model, [[1, 2, 3]], max_new_tokens=1, temperature=0)[0][0]
    assert generate_ids(model, [[1, 2, 3]], max_new_tokens=10, temperature=0, eos_id=first)[0] == [first]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.7, gen).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample_next(logits, 0.0, 1.0, None).item() == 0


def test_token_logprobs_are_differentiable_log_softmax_of_next_tokens(model):
    ids = torch.tensor([[1, 7, 8, 9, 2], [1, 4, 4, 4, 2]])
    logp = token_logprobs(model, ids)
    assert logp.shape == (2, 4) and (logp <= 0).all()
    full = torch.log_softmax(model(ids).logits, -1)
    assert torch.allclose(logp, full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-6)
    logp.sum().backward()
    assert model.backbone.embeddings.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_hidden_states_for_value_and_reward_heads(model):
    out = model(torch.tensor([[1, 2, 3, 4]]), compute_logits=False)
    assert out.logits is None and out.hidden_states.shape == (1, 4, model.args.d_model)


def test_fused_in_place_step_keeps_the_greedy_tokens_of_full_forward_passes():
    """The decoding step (fused, state updated in place) gives the logits of re-reading the
    whole sequence, so greedy tokens are exactly those of the full forward, for a batch of
    prompts of different lengths over 40 tokens."""
    torch.manual_seed(1)
    args = MambaArgs(vocab_size=256, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=16, n_groups=2)
    model = MambaLM(args).eval()
    with torch.no_grad():
        for block in model.backbone.layers:  # per-head decays and skips unlike the init values
            for param in (block.mixer.A_log, block.mixer.D, block.mixer.dt_bias):
                param.add_(torch.randn_like(param) * 0.3)
    prompts = [[1, 5, 9], [1] + list(range(20, 60)), [1, 200]]
    new = generate_ids(model, prompts, max_new_tokens=40, temperature=0)
    with torch.no_grad():
        for prompt, tokens in zip(prompts, new):
            seq = list(prompt) + tokens
            logits = model(torch.tensor([seq])).logits[0, len(prompt) - 1 : -1]
            assert logits.argmax(-1).tolist() == tokens


def test_functional_step_leaves_its_cache_unchanged_and_in_place_step_updates_it(model):
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3], [1, 4, 5]]), return_cache=True).cache
        before = [t.clone() for t in cache.conv + cache.ssm]
        logits, new_cache = model.step(torch.tensor([7, 8]), cache)
        assert all(torch.equal(a, b) for a, b in zip(before, cache.conv + cache.ssm))
        in_place = model.step_(torch.tensor([7, 8]), cache)
        assert torch.equal(in_place, logits)
        assert all(torch.equal(a, b) for a, b in zip(cache.conv + cache.ssm, new_cache.conv + new_cache.ssm))
        assert not torch.equal(before[-1], cache.ssm[-1])


@pytest.mark.slow
def test_compiled_decoder_gives_the_eager_tokens(model):
    """``Decoder(model, "compile")``: torch.compile of the step, same greedy tokens as eager for
    batches of 1 and 3 (the dynamic batch size compiles once per kind, in ``warmup``)."""
    from src.mamba.generate import Decoder

    decoder = Decoder(model, "compile")
    assert decoder.compiled and decoder.fused_greedy
    assert decoder.warmup((1, 3)) > 0 and decoder.compile_seconds > 0
    prompts = [[1, 5, 9], [1, 20, 30, 40], [1, 7]]
    eager = generate_ids(model, prompts, max_new_tokens=12, temperature=0)
    assert generate_ids(model, prompts, max_new_tokens=12, temperature=0, decoder=decoder) == eager
    assert generate_ids(model, prompts[:1], max_new_tokens=12, temperature=0, decoder=decoder) == eager[:1]
    # The compiled greedy loop (blocks of Decoder.block steps in one graph, then single steps).
    for batch in (1, 3):
        with torch.inference_mode():
            start = model(torch.tensor([[1, 5, 9]] * batch), return_cache=True)
            first = start.logits[:, -1].argmax(-1)
            tokens = decoder.greedy(first, MambaCache.concat([start.cache]), 2 * decoder.block + 3)
            expected = _greedy_one_at_a_time(model, first, MambaCache.concat([start.cache]), 2 * decoder.block + 3)
        assert torch.equal(tokens, expected)


def test_step_with_transposed_weights_gives_the_same_logits_and_tokens(model):
    """``step_(..., transposed=model.transposed_weights())`` (the compiled Decoder's faster
    matrix layout) gives the plain step's logits to float32 rounding and the same 20 greedy
    tokens for a batch of 2; the copies are copies (changing them leaves the model alone)."""
    transposed = model.transposed_weights()
    assert len(transposed) == 2 * model.args.n_layers + 1
    assert transposed[-1].shape == model.lm_head.weight.t().shape and transposed[-1].is_contiguous()
    assert transposed[-1].data_ptr() != model.lm_head.weight.data_ptr()
    with torch.inference_mode():
        start = model(torch.tensor([[1, 2, 3], [1, 4, 5]]), return_cache=True)
        plain, fast = MambaCache.concat([start.cache]), MambaCache.concat([start.cache])
        a = b = start.logits[:, -1].argmax(-1)
        for _ in range(20):
            la, lb = model.step_(a, plain), model.step_(b, fast, transposed)
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
            a, b = la.argmax(-1), lb.argmax(-1)
            assert torch.equal(a, b)
        torch.testing.assert_close(fast.ssm[-1], plain.ssm[-1], rtol=1e-5, atol=1e-6)


def _greedy_one_at_a_time(model, token, cache, steps):
    out = []
    for _ in range(steps):
        token = model.step_(token, cache).argmax(-1)
        out.append(token)
    return torch.stack(out, 1)


def test_decoder_greedy_equals_one_step_at_a_time(model):
    """``Decoder.greedy`` (eager here; the compiled one in the slow test above) gives the
    tokens and final state of feeding back the argmax one step at a time."""
    from src.mamba.generate import Decoder

    with torch.inference_mode():
        start = model(torch.tensor([[1, 2, 3], [1, 4, 5]]), return_cache=True)
        first = start.logits[:, -1].argmax(-1)
        mine, ref = MambaCache.concat([start.cache]), MambaCache.concat([start.cache])
        tokens = Decoder(model).greedy(first, mine, 11)
        assert tokens.shape == (2, 11)
        assert torch.equal(tokens, _greedy_one_at_a_time(model, first, ref, 11))
        assert all(torch.equal(a, b) for a, b in zip(mine.ssm + mine.conv, ref.ssm + ref.conv))
        assert Decoder(model).greedy(first, mine, 0).shape == (2, 0)


def test_block_greedy_outputs_equal_step_by_step_generation_with_eos(model):
    """``generate_ids`` with a compiled Decoder and temperature 0 decodes greedily a block at
    a time (``_greedy_outputs``); with the eager Decoder here, it gives exactly the one-step
    loop's tokens, cut after ``eos_id`` per row and at ``max_new_tokens``, for any length."""
    from src.mamba.generate import Decoder, _greedy_outputs

    prompts = [[1, 5, 9], [1, 20, 30, 40], [1, 7]]
    plain = generate_ids(model, prompts, max_new_tokens=30, temperature=0)
    eos = plain[1][4]  # a token that ends at least the second row early
    for max_new in (1, 5, Decoder.block, Decoder.block + 1, 30):
        expected = generate_ids(model, prompts, max_new_tokens=max_new, temperature=0, eos_id=eos)
        with torch.inference_mode():
            starts = [model(torch.tensor([p]), return_cache=True) for p in prompts]
            cache = MambaCache.concat([s.cache for s in starts])
            first = torch.cat([s.logits[:, -1] for s in starts]).argmax(-1)
            got = _greedy_outputs(Decoder(model), first, cache, max_new, eos)
        assert got == expected, max_new
    assert len(expected[1]) == 5 and expected[1][-1] == eos


@pytest.mark.skipif(not native.available()[0], reason="the native kernel cannot be built here")
def test_generate_uses_the_fast_decoder_by_default_and_follows_changed_weights(tokenizer, monkeypatch):
    """Without a decoder, generation runs on the native kernel (no eager step at all), gives
    the eager tokens and samples, and after an in-place change of the weights (an optimizer
    step, ``p.data.copy_``) the next call decodes from the new weights, not stale packed copies."""
    torch.manual_seed(1)
    lm = MambaLM(MambaArgs(vocab_size=300, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=16)).eval()
    prompts = [[1, 17, 45, 99, 3], [1, 5], [1, 17, 45, 99, 3]]
    eager = Decoder(lm, "eager")
    expected = {t: generate_ids(lm, prompts, 12, t, 1.0, seed=5, decoder=eager) for t in (0.0, 1.0)}
    steps = []
    eager_step = MambaLM.step_
    monkeypatch.setattr(MambaLM, "step_", lambda self, *a, **k: steps.append(1) or eager_step(self, *a, **k))
    decoder = default_decoder(lm)
    assert decoder.backend == "native" and default_decoder(lm) is decoder  # cached per model
    for temperature, tokens in expected.items():
        assert generate_ids(lm, prompts, 12, temperature, 1.0, seed=5) == tokens
    text = generate(lm, tokenizer, "a few", max_new_tokens=10, temperature=0)
    assert steps == []  # the eager step never ran
    assert text == generate(lm, tokenizer, "a few", max_new_tokens=10, temperature=0, decoder=eager)

    with torch.no_grad():  # an in-place update bumps the parameters' version counters
        for p in lm.parameters():
            p.mul_(1.5).add_(0.05)
    changed = generate_ids(lm, prompts, 12, 0.0, 1.0)
    assert default_decoder(lm) is not decoder
    assert changed == generate_ids(lm, prompts, 12, 0.0, 1.0, decoder=Decoder(lm, "eager"))
    assert changed != expected[0.0]

    rebuilt = default_decoder(lm)
    with torch.no_grad():  # a write through .data leaves the version counter alone: the checksum sees it
        lm.lm_head.weight.data.copy_(torch.randn_like(lm.lm_head.weight))
    again = generate_ids(lm, prompts, 12, 0.0, 1.0)
    assert default_decoder(lm) is not rebuilt
    assert again == generate_ids(lm, prompts, 12, 0.0, 1.0, decoder=Decoder(lm, "eager")) != changed
