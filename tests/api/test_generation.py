"""The serving engines in-process: text streaming with stop strings, continuous batching of a
real tiny Mamba, and micro-batching (src/api/generation.py, src/api/batching.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from src.api.batching import MicroBatcher
from src.api.generation import GenerationParams, GenerationTimeoutError, GenerationWorker, ServerBusyError, TextStream
from src.mamba import generate, load_mamba


@pytest.fixture(scope="module")
def tiny_lm(tiny_checkpoints):
    return load_mamba(tiny_checkpoints / "mamba", "cpu")


def _stream_all(tokenizer, text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in tokenizer.encode(text):
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return [p for p in pieces if p], stream


def test_text_stream_cuts_at_a_stop_string_without_ever_sending_part_of_it(tiny_lm):
    _, tokenizer = tiny_lm
    text = "def read(path):\n    return open(path).read()\nQuestion: what next"
    pieces, stream = _stream_all(tokenizer, text, stop=["\nQuestion:"])
    assert stream.stopped
    assert "".join(pieces) == text[: text.index("\nQuestion:")]
    assert stream.text == "".join(pieces)
    # Without the stop string the whole text comes out, exactly.
    pieces, stream = _stream_all(tokenizer, text)
    assert "".join(pieces) == text and not stream.stopped


def test_text_stream_never_sends_half_a_utf8_character(tiny_lm):
    _, tokenizer = tiny_lm
    text = "naïve café → ✓ 日本語"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # a 300-token byte-level BPE splits these characters into bytes
    pieces, _ = _stream_all(tokenizer, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_worker_greedy_output_equals_in_process_generation(tiny_lm):
    model, tokenizer = tiny_lm
    worker = GenerationWorker(model, tokenizer, "mamba", max_batch_size=8)
    try:
        for prompt in ("import", "Return the value of"):
            expected = generate(model, tokenizer, prompt, max_new_tokens=24, temperature=0)
            result = worker.generate(prompt, GenerationParams(max_new_tokens=24, temperature=0))
            assert result.text == expected
            assert result.prompt_tokens == 1 + len(tokenizer.encode(prompt))
            assert result.completion_tokens <= 24
            assert result.finish_reason in ("stop", "length")
            assert "".join(worker.stream(prompt, GenerationParams(max_new_tokens=24, temperature=0))) == expected
    finally:
        worker.close()


def test_concurrent_requests_decode_together_and_each_gets_its_own_text(tiny_lm):
    model, tokenizer = tiny_lm
    worker = GenerationWorker(model, tokenizer, "mamba", max_batch_size=16)
    prompts = ["import", "class Queue", "Return the value of the", "def", "The json module", "Open a file"] * 2
    params = [GenerationParams(max_new_tokens=20 + i, temperature=0.9, top_p=0.95, seed=i) for i in range(len(prompts))]
    alone = [worker.generate(p, q) for p, q in zip(prompts, params)]
    assert worker.max_rows == 1
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        barrier.wait()
        results[i] = worker.generate(prompts[i], params[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert worker.max_rows > 1, "concurrent requests were not batched"
        for i, (single, batched) in enumerate(zip(alone, results)):
            # Seeded sampling per row: batching changes neither the length nor (up to float
            # rounding in a batched matmul) the tokens; compare the token counts and the text.
            assert batched.completion_tokens <= params[i].max_new_tokens
            assert batched.text == single.text, f"request {i}: batched text differs from the same request alone"
    finally:
        worker.close()


def test_cancelled_job_leaves_the_batch_and_full_queue_is_busy(tiny_lm):
    model, tokenizer = tiny_lm
    worker = GenerationWorker(model, tokenizer, "mamba", max_batch_size=1, max_pending=1)
    events = []
    first_piece, release = threading.Event(), threading.Event()

    def on_event(kind, payload):
        events.append((kind, payload))
        if kind == "text" and not first_piece.is_set():
            # Hold the worker inside the running job until it has been cancelled: a tiny
            # model on an idle machine would otherwise finish all 400 tokens first.
            first_piece.set()
            release.wait(30)

    try:
        long_job = worker.submit(worker.encode_prompt("import"), GenerationParams(max_new_tokens=400, temperature=1.0), on_event)
        assert first_piece.wait(30)  # the worker is running it; the queue is empty again
        waiting = worker.submit(worker.encode_prompt("def"), GenerationParams(max_new_tokens=2), lambda k, p: None)
        with pytest.raises(ServerBusyError):
            worker.submit(worker.encode_prompt("def"), GenerationParams(max_new_tokens=2), lambda k, p: None)
        long_job.cancel()
        release.set()
        deadline = time.monotonic() + 30
        while not waiting.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.done
        done = [p for k, p in events if k == "done"]
        assert len(done) == 1 and done[0].finish_reason == "cancelled" and done[0].completion_tokens < 400
    finally:
        release.set()
        worker.close()


def test_micro_batcher_runs_waiting_requests_as_one_batch_and_slices_results():
    gate = threading.Event()
    batch_sizes = []

    def double(items):
        gate.wait(5)
        batch_sizes.append(len(items))
        return [2 * x for x in items]

    batcher = MicroBatcher(double, "double", max_items=10)
    try:
        first = batcher.submit([0])  # holds the worker until the gate opens
        time.sleep(0.1)
        futures = [batcher.submit(list(range(i, i + 3))) for i in (1, 4, 7)]
        gate.set()
        assert first.result(5) == [0]
        assert [f.result(5) for f in futures] == [[2, 4, 6], [8, 10, 12], [14, 16, 18]]
        assert batch_sizes == [1, 9]  # the three waiting requests ran together
    finally:
        batcher.close()


def test_micro_batcher_gives_each_caller_the_batch_error():
    def broken(items):
        raise ValueError("bad batch")

    batcher = MicroBatcher(broken, "broken")
    try:
        with pytest.raises(ValueError, match="bad batch"):
            batcher.run(["x"])
        with pytest.raises(ValueError):
            batcher.run(["y"])  # the worker is still alive
    finally:
        batcher.close()


class FaultyLM(torch.nn.Module):
    """A real tiny Mamba whose prefill fails for prompts holding ``poison`` and whose decoding
    steps take at least ``step_delay`` seconds (a slow machine)."""

    def __init__(self, lm, poison: int, step_delay: float = 0.0) -> None:
        super().__init__()
        self.lm, self.poison, self.step_delay = lm, poison, step_delay

    def forward(self, ids, **kwargs):
        if bool((ids == self.poison).any()):
            raise RuntimeError("prefill exploded")
        return self.lm(ids, **kwargs)

    def step(self, tokens, cache):
        if self.step_delay:
            time.sleep(self.step_delay)
        return self.lm.step(tokens, cache)

    def step_(self, tokens, cache, *args):
        # The in-place step the worker's Decoder calls (eager: no transposed weights).
        if self.step_delay:
            time.sleep(self.step_delay)
        return self.lm.step_(tokens, cache, *args)


def test_a_failed_prefill_fails_only_its_request_at_once(tiny_lm):
    model, tokenizer = tiny_lm
    poison = tokenizer.unk_id  # never produced by encoding text
    params = GenerationParams(max_new_tokens=60, temperature=0)
    solo = {p: generate(model, tokenizer, p, max_new_tokens=60, temperature=0) for p in ("import", "class", "def")}
    worker = GenerationWorker(FaultyLM(model, poison, step_delay=0.002), tokenizer, "mamba", max_batch_size=8)
    log: list[tuple[str, str, object]] = []  # (request, kind, payload) in the order the worker reported them
    lock, finished = threading.Lock(), threading.Event()

    def recorder(name: str):
        def on_event(kind, payload):
            with lock:
                log.append((name, kind, payload))
                if name == "import" and kind == "text" and sum(1 for n, k, _ in log if n == "import" and k == "text") == 3:
                    # "import" is decoding: now a poisoned request and a good one arrive together.
                    worker.submit([tokenizer.bos_id, poison] + tokenizer.encode("oops"), params, recorder("poisoned"))
                    worker.submit(worker.encode_prompt("def"), params, recorder("def"))
                if sum(1 for _, k, _ in log if k in ("done", "error")) == 4:
                    finished.set()
        return on_event

    try:
        worker.submit(worker.encode_prompt("import"), params, recorder("import"))
        worker.submit(worker.encode_prompt("class"), params, recorder("class"))
        assert finished.wait(60), log
    finally:
        worker.close()
    ends = [(name, kind) for name, kind, _ in log if kind in ("done", "error")]
    assert ends[0] == ("poisoned", "error")  # answered before any other request finished
    error = next(p for n, k, p in log if n == "poisoned")
    assert "prefill exploded" in str(error) and worker.failed == 1
    results = {n: p for n, k, p in log if k == "done"}
    assert set(results) == {"import", "class", "def"}
    for name, result in results.items():  # the others went on, unaffected
        assert result.text == solo[name]


def test_request_timeout_bounds_every_generation(tiny_lm):
    model, tokenizer = tiny_lm
    worker = GenerationWorker(FaultyLM(model, -1, step_delay=0.01), tokenizer, "mamba", request_timeout_s=0.3)
    long_run = GenerationParams(max_new_tokens=500, temperature=1.0, seed=1)  # 5 s at 10 ms a step
    try:
        began = time.monotonic()
        with pytest.raises(GenerationTimeoutError, match="0.3 s"):
            worker.generate("import", long_run)
        assert time.monotonic() - began < 2.0 and worker.timed_out == 1
        began = time.monotonic()
        with pytest.raises(GenerationTimeoutError):
            asyncio.run(worker.agenerate(worker.encode_prompt("class"), long_run))
        assert time.monotonic() - began < 2.0
        short = worker.generate("import", GenerationParams(max_new_tokens=5, temperature=0))  # the worker goes on
        assert short.completion_tokens >= 1 and worker.active == 0
    finally:
        worker.close()


@pytest.mark.slow
def test_compile_decoder_setting_compiles_once_at_worker_start(tiny_checkpoints):
    """``--decoder compile`` (or ``--compile-decoder``): the service's generation worker compiles its decoding step on
    its own thread before serving, the first request pays nothing more, and the greedy text
    is the eager one."""
    from src.api.main import build_parser, settings_from_args
    from src.api.service import ModelService

    settings = settings_from_args(build_parser().parse_args(["--checkpoints-dir", str(tiny_checkpoints), "--decoder", "compile"]))
    assert settings.decoder == "compile" == settings_from_args(build_parser().parse_args(["--compile-decoder"])).decoder
    service = ModelService(settings)
    try:
        worker = service.generator("mamba")
        assert worker.decoder.compiled
        params = GenerationParams(max_new_tokens=16, temperature=0)
        model, tokenizer = worker.model, worker.tokenizer
        first = worker.generate("import", params)
        compiled_in = worker.decoder.compile_seconds
        assert compiled_in > 0  # warmup ran (on the worker thread) before the request was served
        assert first.text == generate(model, tokenizer, "import", max_new_tokens=16, temperature=0)
        worker.generate("Return the value of", params)
        assert worker.decoder.compile_seconds == compiled_in
    finally:
        service.close()


def test_the_server_decodes_with_the_native_kernel_by_default(tiny_checkpoints):
    """``--decoder auto`` (the default): the float32 CPU model is served by MARK's native
    kernel; greedy text is the eager text, sampled text repeats with its seed, and
    ``--decoder eager`` keeps the plain step."""
    from src.api.main import build_parser, settings_from_args
    from src.api.service import ModelService
    from src.mamba import native

    if not native.available()[0]:
        pytest.skip(f"the native kernel cannot be built here: {native.available()[1]}")
    settings = settings_from_args(build_parser().parse_args(["--checkpoints-dir", str(tiny_checkpoints)]))
    assert settings.decoder == "auto"
    service = ModelService(settings)
    try:
        worker = service.generator("mamba")
        assert worker.decoder.backend == "native"
        model, tokenizer = worker.model, worker.tokenizer
        greedy = GenerationParams(max_new_tokens=16, temperature=0)
        assert worker.generate("import", greedy).text == generate(model, tokenizer, "import", max_new_tokens=16, temperature=0)
        sampled = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
        assert worker.generate("Return the value of", sampled).text == worker.generate("Return the value of", sampled).text
    finally:
        service.close()
    eager = settings_from_args(build_parser().parse_args(["--checkpoints-dir", str(tiny_checkpoints), "--decoder", "eager"]))
    service = ModelService(eager)
    try:
        assert service.generator("mamba").decoder.backend == "eager"
    finally:
        service.close()
