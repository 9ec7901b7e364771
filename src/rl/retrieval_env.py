"""MARK's retrieval-policy environment: choose how to search for each query.

One episode is one query (a contextual bandit, which is what choosing a retrieval strategy
per query is). The agent observes the query's features (:mod:`src.rl.features`: its terms'
rarity, how confident dense and BM25 search are and how much they agree; optionally the
query embedding), picks an action ``(mode, k)``: search ``dense``, ``bm25``, ``hybrid``
(RRF) or ``convex-<w>`` (score fusion, :mod:`src.rag.fusion`) and keep the top ``k``
documents, and is rewarded

    reward = nDCG@k of the retrieved documents - cost_per_extra_doc * (documents retrieved - 1)

so retrieving more documents only pays when it finds a relevant one the smaller list missed.

Search is far too slow to run inside ``step``. :func:`build_retrieval_table` runs every
search once per query and records the features and the nDCG of every action; the
environment then only looks rows up. :func:`load_or_build_retrieval_table` caches the
table on disk, keyed by the checksums of the index files and of the eval queries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from src.core.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from src.core.errors import CheckpointError, DataError
from src.core.logging import get_logger
from src.rag.eval import EvalQuery, read_eval_queries, retrieval_metrics
from src.rag.indexer import INDEX_FILE, METADATA_FILE
from src.rl.features import FEATURE_NAMES, query_features

log = get_logger("rl")

TABLE_KIND = "rl-retrieval-table"
TABLE_FILE = "retrieval_table.pt"
# Bump when the features or the way actions are scored change: cached tables become stale.
TABLE_VERSION = 2  # 2: src/rl/features.py's features, convex-fusion modes, synthetic queries

# The retrieval signals of a query, in observation order (after the embedding, if used).
SIGNAL_NAMES = FEATURE_NAMES


@dataclass(frozen=True)
class RetrievalAction:
    """Search with ``mode`` (``dense``, ``bm25``, ``hybrid`` or ``convex-<w>``) and keep the top ``k`` documents."""

    mode: str
    k: int

    @property
    def label(self) -> str:
        return f"{self.mode}@{self.k}"


def action_table(modes: Sequence[str], k_choices: Sequence[int]) -> list[RetrievalAction]:
    """Every ``(mode, k)`` pair; action ``i`` of the environment is element ``i``."""
    return [RetrievalAction(mode, int(k)) for mode in modes for k in k_choices]


def mode_rankings(retriever: Any, query: str, query_vector: np.ndarray, modes: Sequence[str], depth: int) -> dict[str, list[str]]:
    """Each mode's top ``depth`` doc ids for ``query`` (``retriever.search``; BM25 lists only
    documents sharing a term with the query, so its list may be shorter)."""
    return {mode: [r.doc_id for r in retriever.search(query, top_k=depth, mode=mode, query_vector=query_vector)] for mode in modes}


@dataclass
class RetrievalTable:
    """Every query's observation parts and the outcome of every action on it.

    ``embeddings`` ``(Q, dim)`` and ``signals`` ``(Q, len(SIGNAL_NAMES))`` make the
    observations; ``ndcg[q, a]`` and ``num_retrieved[q, a]`` are what action ``a`` of
    ``actions`` retrieves for query ``q``. ``corpus_checksum`` names the index they came from.
    """

    queries: list[str]
    embeddings: np.ndarray
    signals: np.ndarray
    ndcg: np.ndarray
    num_retrieved: np.ndarray
    actions: list[RetrievalAction]
    corpus_checksum: str
    key: str = ""
    synthetic: np.ndarray | None = None  # (Q,) bool: made from the corpus (src/rl/synthetic.py), not labeled

    def __post_init__(self) -> None:
        if self.synthetic is None:
            self.synthetic = np.zeros(len(self.queries), dtype=bool)

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def rewards(self, cost_per_extra_doc: float) -> np.ndarray:
        """``(Q, A)`` rewards: nDCG minus the cost of every document beyond the first."""
        return (self.ndcg - cost_per_extra_doc * np.maximum(self.num_retrieved - 1, 0)).astype(np.float32)

    def to_state(self) -> dict:
        """A ``weights_only``-loadable dict (see :meth:`from_state`)."""
        return {
            "kind": TABLE_KIND,
            "version": TABLE_VERSION,
            "key": self.key,
            "queries": list(self.queries),
            "embeddings": torch.from_numpy(self.embeddings),
            "signals": torch.from_numpy(self.signals),
            "ndcg": torch.from_numpy(self.ndcg),
            "num_retrieved": torch.from_numpy(self.num_retrieved),
            "actions": [[a.mode, a.k] for a in self.actions],
            "signal_names": list(SIGNAL_NAMES),
            "corpus_checksum": self.corpus_checksum,
            "synthetic": torch.from_numpy(np.asarray(self.synthetic, dtype=bool)),
        }

    @classmethod
    def from_state(cls, state: dict) -> "RetrievalTable":
        return cls(
            queries=list(state["queries"]),
            embeddings=state["embeddings"].numpy(),
            signals=state["signals"].numpy(),
            ndcg=state["ndcg"].numpy(),
            num_retrieved=state["num_retrieved"].numpy(),
            actions=[RetrievalAction(mode, int(k)) for mode, k in state["actions"]],
            corpus_checksum=state["corpus_checksum"],
            key=state["key"],
            synthetic=state["synthetic"].numpy().astype(bool),
        )


def build_retrieval_table(
    retriever: Any,
    queries: Sequence[EvalQuery],
    actions: Sequence[RetrievalAction],
    show_progress: bool = False,
    synthetic: Sequence[EvalQuery] = (),
) -> RetrievalTable:
    """Run every search once per query and score every action (nDCG@k against its relevant docs).

    ``queries`` are the labeled queries, ``synthetic`` the corpus-made ones (appended after
    them; ``table.synthetic`` marks which is which). The top-``k`` documents of an action are
    the first ``k`` of its mode's ranking at the largest ``k``: a prefix for dense and BM25
    (sorted scores), and for the fused modes while the largest ``k`` is at most the
    retriever's fusion ``candidates`` (each ranking is cut there either way); larger ``k``
    are searched on their own.
    """
    everything = list(queries) + list(synthetic)
    if not everything:
        raise DataError("the retrieval environment needs at least one query")
    depth = max(a.k for a in actions)
    modes = list(dict.fromkeys(a.mode for a in actions))
    candidates = int(getattr(retriever.config, "candidates", depth))
    embeddings = retriever.embed_queries([q.query for q in everything])
    signals = np.zeros((len(everything), len(FEATURE_NAMES)), dtype=np.float32)
    ndcg = np.zeros((len(everything), len(actions)), dtype=np.float32)
    num_retrieved = np.zeros((len(everything), len(actions)), dtype=np.int64)
    for qi in tqdm(range(len(everything)), desc="scoring retrieval actions", unit="query", disable=not show_progress):
        query = everything[qi]
        signals[qi] = query_features(retriever, query.query, embeddings[qi])
        rankings = mode_rankings(retriever, query.query, embeddings[qi], modes, depth)
        for ai, action in enumerate(actions):
            if action.mode not in ("dense", "bm25") and action.k > candidates:
                ranked = [r.doc_id for r in retriever.search(query.query, action.k, action.mode, embeddings[qi])]
            else:
                ranked = rankings[action.mode][: action.k]
            ndcg[qi, ai] = retrieval_metrics(ranked, query.relevance, [action.k])[f"ndcg@{action.k}"]
            num_retrieved[qi, ai] = len(ranked)
    return RetrievalTable(
        queries=[q.query for q in everything],
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        signals=signals,
        ndcg=ndcg,
        num_retrieved=num_retrieved,
        actions=list(actions),
        corpus_checksum=retriever.index.corpus_checksum,
        synthetic=np.asarray([False] * len(queries) + [True] * len(synthetic), dtype=bool),
    )


def _eval_data_sha256(eval_file: Path, split: str) -> str:
    if eval_file.is_dir():  # BEIR folder: the queries and the split's qrels
        parts = [eval_file / "queries.jsonl", eval_file / "qrels" / f"{split}.tsv"]
        return hashlib.sha256("".join(file_sha256(p) for p in parts if p.is_file()).encode()).hexdigest()
    return file_sha256(eval_file)


def table_cache_key(
    index_dir: Path, eval_file: Path, split: str, actions: Sequence[RetrievalAction], synthetic: Sequence[EvalQuery] = ()
) -> str:
    """What a cached table depends on: the index files (incl. its search settings), the
    queries (labeled and synthetic), the actions and the table's version."""
    index_files = {name: file_sha256(index_dir / name) for name in (INDEX_FILE, METADATA_FILE, "config.yaml") if (index_dir / name).is_file()}
    blob = json.dumps(
        {
            "version": TABLE_VERSION,
            "index": index_files,
            "eval": _eval_data_sha256(eval_file, split),
            "split": split,
            "actions": [[a.mode, a.k] for a in actions],
            "synthetic": hashlib.sha256(json.dumps([[q.query, sorted(q.relevance)] for q in synthetic]).encode()).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_or_build_retrieval_table(
    index_dir: str | Path,
    eval_file: str | Path,
    actions: Sequence[RetrievalAction],
    cache_dir: str | Path | None = None,
    beir_split: str = "test",
    device: str = "auto",
    show_progress: bool = False,
    synthetic: Sequence[EvalQuery] = (),
) -> RetrievalTable:
    """The table of ``actions`` on the queries of ``eval_file`` (then the ``synthetic`` ones)
    over the index in ``index_dir``.

    With ``cache_dir``, a table cached there (``retrieval_table.pt``) is reused when its key
    (checksums of the index files and eval queries, the actions) matches; otherwise the
    index is opened, the table built and the cache rewritten. A missing index is a
    ``NotTrainedError`` naming the command that builds it.
    """
    from src.rag.load import load_rag_index

    index_dir, eval_file = Path(index_dir), Path(eval_file)
    if not eval_file.exists():
        raise DataError(f"{eval_file}: eval queries not found (the sample data is made by `python -m src.data.prepare`)")
    if not (index_dir / INDEX_FILE).is_file():
        load_rag_index(index_dir, device=device)  # raises the RAG component's own "not built" error
    key = table_cache_key(index_dir, eval_file, beir_split, actions, synthetic)
    cache_path = Path(cache_dir) / TABLE_FILE if cache_dir is not None else None
    if cache_path is not None and cache_path.is_file():
        try:
            state = load_checkpoint(cache_path, kind=TABLE_KIND)
            if state.get("key") == key:
                log.info("retrieval table: reusing %s (%d queries x %d actions)", cache_path, len(state["queries"]), len(state["actions"]))
                return RetrievalTable.from_state(state)
            log.info("retrieval table: %s is for another index, query set or action set; rebuilding", cache_path)
        except CheckpointError as err:
            log.warning("retrieval table: ignoring unreadable cache (%s)", err)

    queries = read_eval_queries(eval_file, beir_split)
    retriever = load_rag_index(index_dir, device=device)
    indexed = retriever.index.documents
    unknown = sorted({d for q in queries for d in q.relevance if d not in indexed})
    if unknown:
        log.warning("%s: %d relevant document id(s) are not in the index %s, e.g. %s", eval_file, len(unknown), index_dir, unknown[0])
    log.info("retrieval table: %d queries x %d actions over %d documents in %s", len(queries), len(actions), len(indexed), index_dir)
    table = build_retrieval_table(retriever, queries, actions, show_progress, synthetic)
    table.key = key
    if cache_path is not None:
        save_checkpoint(table.to_state(), cache_path)
    return table


class QueryObservation:
    """How a query becomes an observation: ``[embedding part, retrieval signals]``.

    The embedding part is the full embedding (``dims=None``), its coordinates on the first
    ``dims`` principal components of the training queries' embeddings (``dims > 0``), or
    nothing (``dims=0``). A few components keep what the query is about without giving a
    policy trained on a few hundred queries hundreds of inputs to overfit on.
    """

    def __init__(self, dims: int | None, mean: np.ndarray | None = None, components: np.ndarray | None = None) -> None:
        self.dims = dims
        self.mean = mean
        self.components = components

    @classmethod
    def fit(cls, train_embeddings: np.ndarray, dims: int | None) -> "QueryObservation":
        """Principal components of ``train_embeddings`` ``(n, dim)`` when ``dims > 0``."""
        if not dims:
            return cls(dims)
        dims = min(dims, train_embeddings.shape[1])
        mean = train_embeddings.mean(axis=0)
        _, _, vt = np.linalg.svd(train_embeddings - mean, full_matrices=False)
        components = vt[:dims]
        # SVD leaves each component's sign arbitrary: fix it so the result is reproducible.
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        return cls(dims, mean.astype(np.float32), (components * signs[:, None]).astype(np.float32))

    def __call__(self, embeddings: np.ndarray, signals: np.ndarray) -> np.ndarray:
        """``(n, dim)`` embeddings and ``(n, len(SIGNAL_NAMES))`` signals -> ``(n, obs_dim)`` float32."""
        embeddings, signals = np.atleast_2d(embeddings), np.atleast_2d(signals)
        if self.dims is None:
            parts = [embeddings, signals]
        elif self.dims == 0:
            parts = [signals]
        else:
            parts = [(embeddings - self.mean) @ self.components.T, signals]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def to_state(self) -> dict[str, Any]:
        """A ``weights_only``-loadable dict (see :meth:`from_state`)."""
        return {"dims": self.dims,
                "mean": None if self.mean is None else torch.from_numpy(self.mean),
                "components": None if self.components is None else torch.from_numpy(self.components)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "QueryObservation":
        as_array = lambda t: None if t is None else t.cpu().numpy()  # noqa: E731
        return cls(state["dims"], as_array(state["mean"]), as_array(state["components"]))


def split_queries(num_queries: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of query indices into ``(train, heldout)``, both non-empty."""
    if num_queries < 2:
        raise DataError(f"the retrieval environment needs at least 2 queries to hold some out (got {num_queries})")
    order = np.random.default_rng(seed).permutation(num_queries)
    num_heldout = min(max(1, round(num_queries * heldout_fraction)), num_queries - 1)
    return np.sort(order[num_heldout:]), np.sort(order[:num_heldout])


TEST_SPLIT_SEED = 0  # fixed: the test queries must not move with system.seed, or tuning over seeds would see them all


def split_test_queries(num_queries: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, test)`` query indices: a fixed random ``test_fraction`` of the queries (the same
    for every seed), set aside before anything else is split or fitted; ``test`` is empty for 0."""
    if test_fraction <= 0:
        return np.arange(num_queries), np.zeros(0, dtype=np.int64)
    if num_queries < 3:
        raise DataError(f"the retrieval environment needs at least 3 queries for a test split (got {num_queries})")
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_queries)
    num_test = min(max(1, round(num_queries * test_fraction)), num_queries - 2)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


class RetrievalPolicyEnv(gym.Env):
    """Gymnasium environment: each episode is one query; one action chooses how to retrieve.

    ``table`` holds the precomputed outcomes, ``query_ids`` the queries this environment
    draws from (the train or the held-out split). With ``shuffle`` the queries come in a
    new seeded random order each pass (every query equally often); without, in order
    (evaluation: ``len(query_ids)`` episodes visit each query once).

    Observation: ``observation(embedding, signals)`` of the query (float32; by default the
    full embedding and the signals, see :class:`QueryObservation`). Action:
    ``Discrete(len(table.actions))``. Info after a step: ``mode``, ``k``, ``ndcg``,
    ``num_retrieved``, ``query_id``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        table: RetrievalTable,
        query_ids: Sequence[int] | None = None,
        cost_per_extra_doc: float = 0.02,
        observation: QueryObservation | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.table = table
        self.query_ids = np.asarray(range(table.num_queries) if query_ids is None else query_ids, dtype=np.int64)
        if len(self.query_ids) == 0:
            raise DataError("the retrieval environment was given no queries")
        self.cost_per_extra_doc = float(cost_per_extra_doc)
        self.observation = observation or QueryObservation(None)
        self.shuffle = shuffle
        self._observations = self.observation(table.embeddings, table.signals)
        self._rewards = table.rewards(cost_per_extra_doc)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(self._observations.shape[1],), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(table.actions))
        # Where the environment is in its sequence of queries: plain ints, so it can be
        # saved in a checkpoint and restored exactly (get_state / set_state).
        self._order_seed = 0
        self._epoch = 0
        self._position = 0
        self._current: int | None = None

    # ----------------------------------------------------------------- gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None or self._current is None:
            # A (re)seeded environment starts its query order again from that seed.
            self._order_seed = int(self.np_random.integers(2**31 - 1))
            self._epoch, self._position = 0, 0
        self._current = self._next_query()
        return self._observations[self._current].copy(), {"query_id": self._current}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._current is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        action = int(action)
        chosen = self.table.actions[action]
        q = self._current
        info = {
            "query_id": q,
            "mode": chosen.mode,
            "k": chosen.k,
            "ndcg": float(self.table.ndcg[q, action]),
            "num_retrieved": int(self.table.num_retrieved[q, action]),
        }
        return self._observations[q].copy(), float(self._rewards[q, action]), True, False, info

    # ----------------------------------------------------------------- helpers
    def _next_query(self) -> int:
        if self._position >= len(self.query_ids):
            self._epoch, self._position = self._epoch + 1, 0
        if self.shuffle:
            order = np.random.default_rng([self._order_seed, self._epoch]).permutation(len(self.query_ids))
            query = int(self.query_ids[order[self._position]])
        else:
            query = int(self.query_ids[self._position])
        self._position += 1
        return query

    def action_label(self, action: int) -> str:
        """``mode@k`` of ``action``."""
        return self.table.actions[int(action)].label

    def best_action(self) -> int:
        """The action with the highest reward on the current query (the hindsight oracle)."""
        if self._current is None:
            raise RuntimeError("call reset() first")
        return int(np.argmax(self._rewards[self._current]))

    def get_state(self) -> dict[str, int]:
        """Where the environment is in its query sequence (plain ints)."""
        return {"order_seed": self._order_seed, "epoch": self._epoch, "position": self._position,
                "current": -1 if self._current is None else self._current}

    def set_state(self, state: dict[str, int]) -> None:
        """Inverse of :meth:`get_state`."""
        self._order_seed, self._epoch, self._position = int(state["order_seed"]), int(state["epoch"]), int(state["position"])
        self._current = None if int(state["current"]) < 0 else int(state["current"])
