"""The two-lane micro-batcher: interactive work does not wait behind bulk work, sub-batches
stay within their token budget, lanes and requests take turns, and batched results equal
encoding one text at a time (the real encoder)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from src.api.batching import MicroBatcher


class Recorder:
    """A batch function that records each batch and, while ``gate`` is closed, holds the
    first batch (a model busy with it)."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, items: list) -> list:
        self.started.set()
        self.gate.wait(5)
        self.batches.append(list(items))
        return [f"r{x}" for x in items]


def test_an_interactive_request_after_a_large_bulk_one_waits_for_at_most_one_sub_batch():
    model = Recorder()
    batcher = MicroBatcher(model, "embedding", max_items=16)
    try:
        finished = []
        bulk = batcher.submit([f"b{i}" for i in range(200)], "bulk")
        bulk.add_done_callback(lambda _: finished.append("bulk"))
        assert model.started.wait(5)  # the first bulk sub-batch is running
        query = batcher.submit(["q"], "interactive")
        query.add_done_callback(lambda _: finished.append("query"))
        model.gate.set()
        assert query.result(5) == ["rq"]
        assert bulk.result(5) == [f"rb{i}" for i in range(200)]  # in order, all of them
        assert finished == ["query", "bulk"]
        assert model.batches[1] == ["q"]  # right after the sub-batch that was running
        assert max(len(b) for b in model.batches) <= 16
        assert batcher.lane_batches == {"interactive": 1, "bulk": 13}
    finally:
        model.gate.set()
        batcher.close()


def test_sub_batches_stay_within_the_padded_token_budget():
    model = Recorder()
    model.gate.set()
    texts = ["x" * n for n in (5, 40, 3, 3, 60, 8, 8, 8, 30, 2, 2, 2, 2, 50)] * 3
    batcher = MicroBatcher(model, "embedding", max_items=64, cost=len, max_cost=100)
    try:
        assert batcher.run(texts, "bulk") == [f"r{t}" for t in texts]
        for batch in model.batches:  # items x the longest item (padding), unless one item alone
            assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 100
        assert len(model.batches) > 3
    finally:
        batcher.close()


def test_a_request_that_did_not_fit_into_a_sub_batch_is_served_by_the_next():
    model = Recorder()
    batcher = MicroBatcher(model, "embedding", max_items=64, cost=len, max_cost=10)
    try:
        hold = batcher.submit(["h"], "bulk")
        assert model.started.wait(5)
        # Each alone fits; together they pass the budget (2 x 8 > 10), so the second waits for
        # the next sub-batch, having been looked at once already.
        first, second = batcher.submit(["xxxxx"], "bulk"), batcher.submit(["yyyyyyyy"], "bulk")
        model.gate.set()
        assert (hold.result(5), first.result(5), second.result(5)) == (["rh"], ["rxxxxx"], ["ryyyyyyyy"])
        assert model.batches == [["h"], ["xxxxx"], ["yyyyyyyy"]]
    finally:
        model.gate.set()
        batcher.close()


def test_small_requests_go_before_large_ones_and_bulk_is_never_starved():
    model = Recorder()
    batcher = MicroBatcher(model, "embedding", max_items=4, interactive_weight=3)
    try:
        hold = batcher.submit(["h"], "interactive")
        assert model.started.wait(5)
        big = batcher.submit([f"B{i}" for i in range(40)], "bulk")
        small = batcher.submit(["s0", "s1"], "bulk")  # after the big one, same lane
        queries = [batcher.submit([f"q{i}"], "interactive") for i in range(40)]
        model.gate.set()
        assert hold.result(5) == ["rh"]
        assert small.result(5) == ["rs0", "rs1"]
        assert all(len(q.result(5)) == 1 for q in queries) and len(big.result(5)) == 40
        order = [item for batch in model.batches for item in batch]
        # The small bulk request, sent after the big one, went first ...
        assert order.index("s1") < order.index("B0")
        # ... and while interactive work kept coming, bulk got one sub-batch in four.
        first_small = next(i for i, b in enumerate(model.batches) if "s0" in b)
        assert first_small <= 1 + 3 + 1 + 3 + 1
        bulk_turns = [i for i, b in enumerate(model.batches[1:12], 1) if b[0][0] in "Bs"]
        assert len(bulk_turns) >= 2
    finally:
        model.gate.set()
        batcher.close()


def test_a_large_request_still_moves_while_small_ones_keep_coming():
    model = Recorder()
    batcher = MicroBatcher(model, "embedding", max_items=4)
    try:
        hold = batcher.submit(["h"], "bulk")
        assert model.started.wait(5)
        big = batcher.submit([f"B{i}" for i in range(8)], "bulk")
        smalls = [batcher.submit([f"s{i}"], "bulk") for i in range(60)]
        model.gate.set()
        assert big.result(5) == [f"rB{i}" for i in range(8)] and hold.result(5) == ["rh"]
        assert all(f.result(5) for f in smalls)
        first_big = next(i for i, b in enumerate(model.batches) if "B0" in b)
        assert 1 < first_big <= 1 + 8 + 1  # passed over by smaller requests at most 8 times
    finally:
        model.gate.set()
        batcher.close()


def test_with_two_replicas_one_worker_stays_free_for_interactive_work():
    bulk_gate, bulk_started = threading.Event(), threading.Event()

    def model(items):  # bulk sub-batches are slow until the gate opens
        if items[0].startswith("b"):
            bulk_started.set()
            bulk_gate.wait(5)
        return [f"r{x}" for x in items]

    batcher = MicroBatcher([model, model], "embedding", max_items=8)
    try:
        bulk = batcher.submit([f"b{i}" for i in range(32)], "bulk")
        assert bulk_started.wait(5)
        # One replica holds a bulk sub-batch; the other may not take bulk work too (one
        # worker stays free), so the query is served at once.
        assert batcher.submit(["q"], "interactive").result(2) == ["rq"]
        assert not bulk.done()
        bulk_gate.set()
        assert bulk.result(5) == [f"rb{i}" for i in range(32)]
    finally:
        bulk_gate.set()
        batcher.close()


def test_a_failed_sub_batch_fails_its_request_only_and_drops_the_rest_of_it():
    def flaky(items):
        if "bad" in items:
            raise ValueError("bad batch")
        return items

    batcher = MicroBatcher(flaky, "embedding", max_items=2)
    try:
        with pytest.raises(ValueError, match="bad batch"):
            batcher.run(["a", "b", "bad", "c", "d", "e"], "bulk")
        assert batcher.run(["x", "y", "z"], "interactive") == ["x", "y", "z"]
        assert batcher.pending == 0
    finally:
        batcher.close()


def test_closing_fails_the_waiting_requests_and_refuses_new_ones():
    from src.api.generation import ServerBusyError

    model = Recorder()
    batcher = MicroBatcher(model, "embedding", max_items=2, max_pending=2)
    bulk = batcher.submit(list(range(10)), "bulk")
    assert model.started.wait(5)
    batcher.submit(["q"])
    with pytest.raises(ServerBusyError, match="already waiting"):
        batcher.submit(["q2"])
    model.gate.set()
    batcher.close()
    assert isinstance(bulk.exception(5), ServerBusyError) or len(bulk.result(5)) == 10
    with pytest.raises(ServerBusyError, match="shut down"):
        batcher.submit(["late"])


def test_batched_results_equal_encoding_one_text_at_a_time(tiny_checkpoints):
    """The real encoder behind two replicas and both lanes: each text's vector and token count
    equal encoding it alone."""
    from src.api.service import embedding_fn, encoder_replica
    from src.rag.load import load_rag_index

    encoder = load_rag_index(tiny_checkpoints / "rag", device="cpu").index.encoder
    words = "the server reads each text and returns one unit vector per text".split()
    texts = [" ".join(words[: 1 + (7 * i) % len(words)]) * (1 + i % 3) for i in range(12)]
    batcher = MicroBatcher(
        [embedding_fn(encoder), embedding_fn(encoder_replica(encoder))], "embedding", 64,
        cost=lambda t: 2 + len(t) // 4, max_cost=60,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs it; tiny batches
    try:
        futures = [batcher.submit(texts[:8], "bulk"), batcher.submit(texts[8:10]), batcher.submit(texts[10:], "interactive")]
        rows = [row for f in futures for row in f.result(60)]
    finally:
        batcher.close()
        torch.set_num_threads(threads)
    assert batcher.batches >= 3  # it was split
    for text, (vector, tokens) in zip(texts, rows):
        alone = encoder.encode([text])[0]
        np.testing.assert_allclose(vector, alone, atol=1e-5)
        assert tokens == len(encoder.tokenizer(text)["input_ids"])


def test_the_worker_kept_for_queries_helps_with_bulk_work_in_small_sub_batches():
    gate, held = threading.Event(), threading.Event()
    sizes: dict[str, list[int]] = {"bulk": [], "kept": []}

    def model(items):  # the bulk worker (the first) is held until the gate opens
        bulk_worker = threading.current_thread().name.endswith("-0")
        if bulk_worker and not held.is_set():
            held.set()
            gate.wait(5)
        sizes["bulk" if bulk_worker else "kept"].append(sum(map(len, items)))
        return items

    batcher = MicroBatcher([model, model], "embedding", max_items=64, cost=len, max_cost=40)
    try:
        bulk = batcher.submit(["xxxx"] * 40, "bulk")  # 160 tokens: 4 full sub-batches
        assert held.wait(5)
        deadline = time.monotonic() + 5
        while sum(sizes["kept"]) < 120 and time.monotonic() < deadline:
            time.sleep(0.01)  # the kept worker goes on with quarter sub-batches (10 tokens)
        assert sum(sizes["kept"]) == 120 and max(sizes["kept"]) <= 10
        gate.set()
        assert bulk.result(5) == ["xxxx"] * 40
        assert sizes["bulk"] == [40]
    finally:
        gate.set()
        batcher.close()


def test_each_worker_runs_at_its_niceness():
    import os

    seen: dict[str, int] = {}
    gate, held = threading.Event(), threading.Event()

    def model(items):
        name = threading.current_thread().name
        seen[name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if name.endswith("-0"):  # the bulk worker waits until the query is served
            held.set()
            gate.wait(5)
        return items

    base = os.getpriority(os.PRIO_PROCESS, 0)
    batcher = MicroBatcher([model, model], "embedding", max_items=1, nice=[7, 0])
    try:
        bulk = batcher.submit(["b"], "bulk")  # bulk work goes to the bulk worker
        assert held.wait(5)
        assert batcher.run(["q"], "interactive") == ["q"]  # the kept worker serves the query
        gate.set()
        assert bulk.result(5) == ["b"]
        assert seen == {"batch-embedding-0": max(base, 7), "batch-embedding-1": base}  # 0: left as it was
    finally:
        gate.set()
        batcher.close()
    with pytest.raises(ValueError, match="one value per replica"):
        MicroBatcher([model, model], "embedding", nice=[1, 2, 3])
