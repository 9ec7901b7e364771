"""MARK's retrieval-policy environment on a real (small) RAG index: the precomputed table
matches live search, the Gymnasium contract holds, the query order is exact and resumable."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from src.core.errors import DataError, NotTrainedError
from src.rag.eval import read_eval_queries, retrieval_metrics
from src.rl.features import query_features
from src.rl.retrieval_env import (
    SIGNAL_NAMES,
    TABLE_FILE,
    QueryObservation,
    RetrievalPolicyEnv,
    action_table,
    load_or_build_retrieval_table,
    mode_rankings,
    split_queries,
    split_test_queries,
)


def test_table_covers_every_query_and_action(rl_table, rl_data_dir):
    queries = read_eval_queries(rl_data_dir / "rag_eval.jsonl")
    assert rl_table.num_queries == len(queries) >= 30
    assert [a.label for a in rl_table.actions][:4] == ["dense@1", "dense@3", "dense@5", "dense@10"]
    assert rl_table.ndcg.shape == rl_table.num_retrieved.shape == (len(queries), len(rl_table.actions))
    assert not rl_table.synthetic.any()
    assert rl_table.embeddings.shape == (len(queries), 384)
    assert rl_table.signals.shape == (len(queries), len(SIGNAL_NAMES))
    assert np.all((rl_table.ndcg >= 0) & (rl_table.ndcg <= 1 + 1e-6))
    assert np.isfinite(rl_table.signals).all()
    ks = np.array([a.k for a in rl_table.actions])
    assert np.all(rl_table.num_retrieved <= ks)
    # Dense always fills k (40 documents indexed); more documents never lower nDCG of a prefix.
    assert np.all(rl_table.num_retrieved[:, :4] == ks[:4])
    assert np.all(np.diff(rl_table.ndcg[:, :4], axis=1) >= -1e-6)


def test_table_matches_live_search(rl_table, rl_retriever, rl_data_dir):
    queries = read_eval_queries(rl_data_dir / "rag_eval.jsonl")
    for qi in range(0, len(queries), 5):
        query = queries[qi]
        vector = rl_retriever.embed_queries([query.query])[0]
        for ai, action in enumerate(rl_table.actions):
            hits = [r.doc_id for r in rl_retriever.search(query.query, top_k=action.k, mode=action.mode, query_vector=vector)]
            expected = retrieval_metrics(hits, query.relevance, [action.k])[f"ndcg@{action.k}"]
            assert rl_table.ndcg[qi, ai] == pytest.approx(expected, abs=1e-6), (query.query, action)
            assert rl_table.num_retrieved[qi, ai] == len(hits)
        # The signals computed at inference time are the ones in the table.
        np.testing.assert_allclose(vector, rl_table.embeddings[qi], atol=1e-5)
        np.testing.assert_allclose(query_features(rl_retriever, query.query, vector), rl_table.signals[qi], atol=1e-5)
        rankings = mode_rankings(rl_retriever, query.query, vector, ["bm25"], 10)
        assert rankings["bm25"][:3] == [r.doc_id for r in rl_retriever.search(query.query, 3, "bm25")]


def test_features_say_what_they_mean(rl_table):
    s = {name: rl_table.signals[:, i] for i, name in enumerate(SIGNAL_NAMES)}
    assert np.all(s["dense_margin"] >= 0) and np.all(s["dense_spread"] >= s["dense_margin"] - 1e-6)
    for name in ("idf_mean", "idf_max", "idf_min", "oov_share", "bm25_margin", "bm25_hits", "overlap_top3", "overlap_top10"):
        assert np.all((s[name] >= 0) & (s[name] <= 1 + 1e-6)), name
    assert np.all(s["idf_min"] <= s["idf_mean"] + 1e-6) and np.all(s["idf_mean"] <= s["idf_max"] + 1e-6)
    assert set(np.unique(s["top1_agree"])) <= {0.0, 1.0}
    # Where the two searches agree on the best document, each ranks the other's best first.
    agree = s["top1_agree"] == 1
    assert agree.any() and np.all(s["dense_first_in_bm25"][agree] == 1) and np.all(s["bm25_first_in_dense"][agree] == 1)
    assert np.ptp(s["idf_mean"]) > 0.1 and np.ptp(s["dense_top1"]) > 0.1  # they vary across queries


# The observation space is unbounded on purpose (BM25 scores have no upper bound).
@pytest.mark.filterwarnings("ignore:.*Box observation space m.* value is .*infinity")
def test_passes_gymnasium_check_env(rl_table):
    for dims in (None, 0, 4):
        observation = QueryObservation.fit(rl_table.embeddings, dims)
        env = RetrievalPolicyEnv(rl_table, np.arange(10), observation=observation)
        check_env(env, skip_render_check=True)


def test_step_rewards_ndcg_minus_cost_of_extra_documents(rl_table):
    env = RetrievalPolicyEnv(rl_table, [3], cost_per_extra_doc=0.05, shuffle=False)
    obs, info = env.reset(seed=0)
    assert info["query_id"] == 3 and obs.shape == env.observation_space.shape
    np.testing.assert_array_equal(obs, np.concatenate([rl_table.embeddings[3], rl_table.signals[3]]))
    for action, chosen in enumerate(rl_table.actions):
        env.reset()
        _, reward, terminated, truncated, info = env.step(action)
        assert terminated and not truncated
        assert (info["mode"], info["k"]) == (chosen.mode, chosen.k)
        extra = max(rl_table.num_retrieved[3, action] - 1, 0)
        assert reward == pytest.approx(rl_table.ndcg[3, action] - 0.05 * extra)
        assert info["ndcg"] == pytest.approx(rl_table.ndcg[3, action])
    assert env.best_action() == int(np.argmax(rl_table.rewards(0.05)[3]))
    with pytest.raises(ValueError):
        env.step(len(rl_table.actions))


def test_query_order_visits_each_query_once_per_pass_and_is_resumable(rl_table):
    ids = np.arange(0, 20)
    env = RetrievalPolicyEnv(rl_table, ids)
    env.reset(seed=5)
    first_pass = [env.get_state()["current"]] + [env.reset()[1]["query_id"] for _ in range(19)]
    assert sorted(first_pass) == list(ids)
    second_pass = [env.reset()[1]["query_id"] for _ in range(20)]
    assert sorted(second_pass) == list(ids) and second_pass != first_pass

    saved = env.get_state()
    expected = [env.reset()[1]["query_id"] for _ in range(15)]
    restored = RetrievalPolicyEnv(rl_table, ids)
    restored.set_state(saved)
    assert [restored.reset()[1]["query_id"] for _ in range(15)] == expected

    again = RetrievalPolicyEnv(rl_table, ids)
    again.reset(seed=5)
    assert again.get_state()["current"] == first_pass[0]

    ordered = RetrievalPolicyEnv(rl_table, [7, 2, 9], shuffle=False)
    assert [ordered.reset()[1]["query_id"] for _ in range(4)] == [7, 2, 9, 7]


def test_test_split_is_fixed_disjoint_and_independent_of_the_seed():
    rest, test = split_test_queries(100, 0.2)
    assert len(test) == 20 and set(rest).isdisjoint(test) and set(rest) | set(test) == set(range(100))
    assert np.array_equal(split_test_queries(100, 0.2)[1], test)  # no seed: the same for every run
    for seed in (0, 1, 42):  # train / val come from the rest only
        train, val = split_queries(len(rest), 0.2, seed)
        assert set(rest[train]).isdisjoint(test) and set(rest[val]).isdisjoint(test)
    assert len(split_test_queries(10, 0.0)[1]) == 0
    with pytest.raises(DataError):
        split_test_queries(2, 0.2)


def test_split_is_seeded_disjoint_and_complete():
    train, heldout = split_queries(100, 0.2, seed=3)
    assert len(heldout) == 20 and len(train) == 80
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(range(100))
    again = split_queries(100, 0.2, seed=3)
    assert np.array_equal(again[0], train) and not np.array_equal(split_queries(100, 0.2, seed=4)[1], heldout)
    assert [len(part) for part in split_queries(3, 0.9, seed=0)] == [1, 2]
    with pytest.raises(DataError):
        split_queries(1, 0.2, seed=0)


def test_query_observation_projects_on_training_principal_components(rl_table):
    train = rl_table.embeddings[:30]
    full = QueryObservation.fit(train, None)(rl_table.embeddings, rl_table.signals)
    none = QueryObservation.fit(train, 0)(rl_table.embeddings, rl_table.signals)
    pca = QueryObservation.fit(train, 4)
    projected = pca(rl_table.embeddings, rl_table.signals)
    assert full.shape[1] == 384 + len(SIGNAL_NAMES) and none.shape[1] == len(SIGNAL_NAMES) and projected.shape[1] == 4 + len(SIGNAL_NAMES)
    np.testing.assert_allclose(projected[:, 4:], rl_table.signals)
    # Orthonormal components; on the training queries, coordinates are centred with falling variance.
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(4), atol=1e-5)
    coords = pca(train, rl_table.signals[:30])[:, :4]
    np.testing.assert_allclose(coords.mean(axis=0), 0, atol=1e-5)
    assert np.all(np.diff(coords.var(axis=0)) <= 1e-6)
    restored = QueryObservation.from_state(pca.to_state())
    np.testing.assert_array_equal(restored(rl_table.embeddings, rl_table.signals), projected)


def test_cached_table_is_reused_and_rebuilt_when_the_index_changes(rl_table, rl_rag_index, rl_data_dir, tmp_path, monkeypatch):
    index_dir = tmp_path / "index"
    shutil.copytree(rl_rag_index, index_dir)
    cache = tmp_path / "cache"
    actions = action_table(["dense", "bm25"], [1, 2])
    built = load_or_build_retrieval_table(index_dir, rl_data_dir / "rag_eval.jsonl", actions, cache_dir=cache, device="cpu")
    assert (cache / TABLE_FILE).is_file()
    np.testing.assert_allclose(built.ndcg[:, 0], rl_table.ndcg[:, 0], atol=1e-6)  # dense@1 in both tables

    import src.rag.load as rag_load_module

    def no_index(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(rag_load_module, "load_rag_index", no_index)
    cached = load_or_build_retrieval_table(index_dir, rl_data_dir / "rag_eval.jsonl", actions, cache_dir=cache, device="cpu")
    np.testing.assert_array_equal(cached.ndcg, built.ndcg)
    assert cached.key == built.key and cached.queries == built.queries

    (index_dir / "config.yaml").write_text((index_dir / "config.yaml").read_text() + "\n# changed\n")
    with pytest.raises(AssertionError, match="cached table"):
        load_or_build_retrieval_table(index_dir, rl_data_dir / "rag_eval.jsonl", actions, cache_dir=cache, device="cpu")


def test_missing_index_or_queries_are_one_line_errors(tmp_path, rl_data_dir, rl_rag_index):
    actions = action_table(["dense"], [1])
    with pytest.raises(NotTrainedError, match="train_rag_indexer"):
        load_or_build_retrieval_table(tmp_path / "none", rl_data_dir / "rag_eval.jsonl", actions, device="cpu")
    with pytest.raises(DataError, match="src.data.prepare"):
        load_or_build_retrieval_table(rl_rag_index, tmp_path / "missing.jsonl", actions, device="cpu")
