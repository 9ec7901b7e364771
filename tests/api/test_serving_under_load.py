"""What keeps the retrieval path fast when the server is busy (``bench/api_load.py`` measures
it): evidence sentences embedded once however many queries want them at once, grounded
prompts read as the RLHF model was trained on them, worker priorities, and a warm-up before
the server says it is ready."""

from __future__ import annotations

import asyncio
import os
import threading

import httpx
import numpy as np

from src.api.generation import GenerationParams
from src.api.main import build_parser, settings_from_args
from src.api.service import EVIDENCE_EMBEDDED, ModelService, split_sentences


def service_on(checkpoints, *args: str) -> ModelService:
    return ModelService(settings_from_args(build_parser().parse_args(["--checkpoints-dir", str(checkpoints), *args])))


def test_concurrent_queries_embed_each_evidence_sentence_once(tiny_checkpoints):
    service = service_on(tiny_checkpoints)
    fresh = service_on(tiny_checkpoints)
    try:
        retriever = service.retriever()
        query = "How do I read a file?"
        hits = retriever.search(query, 3, "bm25")
        sentences = {s for hit in hits for s in split_sentences(hit.text)}
        assert len(sentences) >= 3

        async def many():
            return await asyncio.gather(*(service.evidence(query, hits, 3) for _ in range(8)))

        results = asyncio.run(many())
        embedder = service.embedder()
        # 8 query vectors + each shortlisted sentence once (not 8 times)
        shortlisted = min(len(sentences), EVIDENCE_EMBEDDED)
        assert embedder.items == 8 + shortlisted
        # Batched with other texts, a vector may differ in the last bits: same sentences, same order.
        assert all([(e.doc_id, e.sentence) for e in r] == [(e.doc_id, e.sentence) for e in results[0]] for r in results)
        # The same evidence as one request alone on a fresh service, and the cache is filled.
        alone = asyncio.run(fresh.evidence(query, hits, 3))
        assert [(e.doc_id, e.sentence) for e in alone] == [(e.doc_id, e.sentence) for e in results[0]]
        np.testing.assert_allclose([e.score for e in alone], [e.score for e in results[0]], atol=1e-5)
        assert not service._sentences_in_flight and set(service._sentence_vectors) <= sentences
        assert len(service._sentence_vectors) == shortlisted
        before = embedder.items
        asyncio.run(service.evidence(query, hits, 3))
        assert embedder.items == before + 1  # only the query
    finally:
        service.close()
        fresh.close()


def test_grounded_prompts_are_cut_as_the_rlhf_model_was_trained(full_checkpoints):
    import yaml

    service = service_on(full_checkpoints)
    try:
        trained = yaml.safe_load((full_checkpoints / "rlhf" / "config.yaml").read_text())["model"]["max_prompt_tokens"]
        assert service.registry.get("rlhf").details["max_prompt_tokens"] == trained
        assert "max_prompt_tokens" not in service.registry.get("mamba").details
        worker = service.generator("rlhf")
        prompt = "Context:\n[a.md] " + "the reader opens the file and returns its lines " * 40 + "\n\nQuestion: what opens?\nAnswer:"
        whole = service.prompt_ids(worker, prompt)
        assert len(whole) > trained
        cut = service.grounded_prompt_ids(worker, prompt)
        assert len(cut) == trained and cut[0] == worker.tokenizer.bos_id and cut[1:] == whole[-(trained - 1):]
        assert service.grounded_prompt_ids(service.generator("mamba"), prompt) == service.prompt_ids(service.generator("mamba"), prompt)
        short = "Question: what?\nAnswer:"
        assert len(service.prompt_ids(worker, short)) <= trained
        assert service.grounded_prompt_ids(worker, short) == service.prompt_ids(worker, short)
        # the LangGraph graph reads its grounded prompts the same way
        from src.integrations.graph import MARKLangChainGraph

        graph = MARKLangChainGraph(llm_model="rlhf", registry=service.registry)
        assert graph.llm.grounded and graph._worker.encode_grounded(prompt) == cut
        graph.close()
    finally:
        service.close()


def test_workers_off_the_retrieval_path_run_at_background_niceness(full_checkpoints):
    """/query answers with the RLHF model: its worker keeps the normal priority; the base
    model, the classifier and the reward model run at ``--background-nice``."""
    service = service_on(full_checkpoints, "--background-nice", "9")
    try:
        assert service.registry.answer_model() == "rlhf"
        workers = {"generate-rlhf": service.generator("rlhf"), "generate-mamba": service.generator("mamba")}
        workers["generate-rlhf"].generate("a", GenerationParams(max_new_tokens=1))
        workers["generate-mamba"].generate("a", GenerationParams(max_new_tokens=1))
        service.classifier().run(["a text"])
        service.scorer().run([("a", "b")])
        service.embedder().run(["a query"])
        base = os.getpriority(os.PRIO_PROCESS, 0)
        niceness = {
            t.name: os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threading.enumerate()
            if t.name.startswith(("generate-", "batch-"))
        }
        assert niceness["generate-rlhf"] == base and niceness["batch-embedding-0"] == base
        assert niceness["generate-mamba"] == niceness["batch-classification-0"] == niceness["batch-score-0"] == max(base, 9)
    finally:
        service.close()


def test_the_server_warms_up_every_worker_before_it_says_ready(full_server):
    health = httpx.get(f"{full_server.url}/health").json()
    assert health["ready"] is True
    stats = httpx.get(f"{full_server.url}/models").json()["generation"]
    assert stats["mamba"]["steps"] >= 1 and stats["rlhf"]["steps"] >= 1  # a warm-up request went through each
