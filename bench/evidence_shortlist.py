"""Evidence shortlist: /query's evidence when every candidate sentence is embedded (before)
against the lexical shortlist of EVIDENCE_EMBEDDED (now), on the sample questions and the demo
index (top 3 hits, as /query). Prints and writes bench/results/evidence_shortlist.json.

    python bench/evidence_shortlist.py [--index checkpoints/rag]
"""
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
from src.rag.load import load_rag_index
from src.rag.retriever import Retriever
from src.api.service import split_sentences, lexical_shortlist, MAX_EVIDENCE_CANDIDATES, EVIDENCE_EMBEDDED
index = load_rag_index(sys.argv[sys.argv.index("--index") + 1] if "--index" in sys.argv else "checkpoints/rag")
ret = index
qs = [json.loads(l)["query"] for f in ("data/rag_eval.jsonl", "data/rag_eval_hard.jsonl") for l in open(f)]
top1 = top3 = n = 0; sizes = []; loss = []
for q in qs:
    hits = ret.search(q, top_k=3)
    cands, seen = [], set()
    for h in hits:
        for s in split_sentences(h.text):
            if s not in seen and len(cands) < MAX_EVIDENCE_CANDIDATES:
                seen.add(s); cands.append((h.doc_id, s))
    if not cands: continue
    qv = ret.embed_queries([q])[0]
    vec = index.index.encoder.encode([s for _, s in cands])
    sc = vec @ qv
    full = [cands[i] for i in np.argsort(-sc, kind="stable")[:3]]
    short = lexical_shortlist(q, cands, EVIDENCE_EMBEDDED)
    ssc = np.array([sc[cands.index(c)] for c in short])
    sh = [short[i] for i in np.argsort(-ssc, kind="stable")[:3]]
    n += 1; top1 += full[0] == sh[0]; top3 += len(set(full) & set(sh)) / 3; sizes.append(len(cands)); loss.append(sc.max() - ssc.max())
result = ({"queries": n, "candidates_mean": float(np.mean(sizes)), "embedded_mean": float(np.mean(np.minimum(sizes, EVIDENCE_EMBEDDED))),
                  "top1_same": top1 / n, "top3_overlap": top3 / n, "best_cosine_lost_mean": float(np.mean(loss))})
print(json.dumps(result))
Path(__file__).resolve().parent.joinpath("results", "evidence_shortlist.json").write_text(json.dumps(result, indent=2) + "\n")
