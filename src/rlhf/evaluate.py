"""Stage 4, evaluation on the **test** split: did PPO and DPO make answers the reward model
prefers, at what distance from the SFT model, and is the reward model worth trusting?

Everything here reads ``data.sft_test_file`` and ``data.preferences_test_file``, which no
stage trains on and nothing selects with (checkpoints are picked on the val split). For every
test prompt the SFT model and each aligned policy sample one answer with the same settings
and seed. Then:

* **reward**: the reward model's normalized score of each answer; mean per model, and for the
  dataset's reference answers as an anchor;
* **win rate**: share of prompts where the policy's answer outscores SFT's (ties count half);
* **KL(policy || SFT)**: mean summed per-token log-ratio of the policy's answers, nats per answer;
* **the reward model against cheap baselines** on the test preference pairs: random (0.5),
  the longer answer, and zero-shot cosine(prompt, answer) of MiniLM sentence embeddings;
  DPO's implicit reward ``beta * log(pi / pi_ref)`` ranks the same pairs;
* **perplexity** of the reference answers under base, SFT and the policies;
* **grounded answers**, what the server's ``/query`` and the LangChain graph serve: on the test
  prompts in the retrieval-grounded template (:mod:`src.data.prompts`), read exactly as the
  server reads them (no template, no cut) and answered greedily up to the first stop string,
  the rate of non-empty answers and ROUGE-L F1 against the reference answer, for base, SFT
  and the policies, next to an extractive baseline (the best-matching sentence of the passage
  that best matches the question).

Writes ``evaluation.json`` (every number), ``evaluation.md`` (the tables, and the answers of
SFT, PPO and DPO to ``samples_in_report`` test prompts with their rewards) and
``evaluation.png`` (PPO's training curve and the score distributions).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from src.core.checkpoint import atomic_write_json, atomic_write_text
from src.core.logging import setup_logging
from src.core.runtime import resolve_device, seed_everything
from src.data.prompts import ANSWER_STOP, Passage, cut_at_stop, is_grounded_prompt, parse_grounded_prompt
from src.data.readers import PreferenceExample, SFTExample
from src.mamba.generate import generate_ids
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer
from src.rlhf.config import EvaluationConfig, StageConfig
from src.rlhf.data import PreferenceDataset, PromptFormat, SFTDataset
from src.rlhf.ppo import build_response_batch, response_logprobs, reward_scores, sequence_kl
from src.rlhf.reward_model import evaluate_pairs
from src.rlhf.sft import evaluate_response_loss

KIND = "rlhf_evaluation"


def sample_responses(
    lm: MambaLM, prompts: Sequence[Sequence[int]], cfg: EvaluationConfig, eos_id: int, seed: int
) -> list[list[int]]:
    """One sampled response per prompt (batches of ``cfg.batch_size``; batch ``b`` uses seed
    ``seed + b``, so two models sampled with the same seed see the same random numbers)."""
    responses: list[list[int]] = []
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        chunk = prompts[start : start + cfg.batch_size]
        responses += generate_ids(lm, chunk, cfg.max_new_tokens, cfg.temperature, 1.0, seed=seed + b, eos_id=eos_id)
    return responses


@torch.no_grad()
def response_kl(
    policy: MambaLM,
    reference: MambaLM,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N,) KL estimate of each of ``policy``'s responses to ``reference``: the summed
    ``log pi(y_t) - log pi_ref(y_t)`` over its tokens (nats)."""
    device = next(policy.parameters()).device
    kls = []
    for start in range(0, len(prompts), batch_size):
        batch = build_response_batch(prompts[start : start + batch_size], responses[start : start + batch_size], pad_id).to(device)
        logprobs, _, _ = response_logprobs(policy, batch.input_ids, batch.positions, batch.targets, temperature)
        ref_logprobs, _, _ = response_logprobs(reference, batch.input_ids, batch.positions, batch.targets, temperature)
        kls.append(sequence_kl(logprobs, ref_logprobs, batch.mask).cpu())
    return torch.cat(kls)


def win_rate(challenger: torch.Tensor, incumbent: torch.Tensor) -> float:
    """Share of paired scores where ``challenger`` beats ``incumbent`` (ties count half)."""
    return float(((challenger > incumbent).float() + 0.5 * (challenger == incumbent).float()).mean())


def preference_baselines(examples: Sequence[PreferenceExample], cosine_model: str | None = "minilm-local") -> dict[str, float]:
    """Pairwise accuracy of cheap rankers on preference pairs, measured like the reward model's
    (ties count half): ``random`` (0.5 in expectation), ``length`` (the longer answer wins, in
    characters) and, when ``cosine_model`` is set, zero-shot ``cosine`` (the answer whose sentence
    embedding is closer to the prompt's wins)."""
    def accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
        return win_rate(chosen, rejected)

    out = {
        "random": 0.5,
        "length": accuracy(torch.tensor([float(len(e.chosen)) for e in examples]), torch.tensor([float(len(e.rejected)) for e in examples])),
    }
    if cosine_model and examples:
        from sentence_transformers import SentenceTransformer

        from src.core.hub import hub_error, resolve_pretrained

        try:
            encoder = SentenceTransformer(resolve_pretrained(cosine_model), device="cpu")
        except Exception as err:  # not a sentence-transformers folder, offline hub miss
            raise hub_error(cosine_model, "evaluation.cosine_baseline_model", err) from None

        def embed(texts: list[str]) -> torch.Tensor:
            return torch.from_numpy(encoder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False))

        prompts = embed([e.prompt for e in examples])
        out["cosine"] = accuracy((prompts * embed([e.chosen for e in examples])).sum(-1), (prompts * embed([e.rejected for e in examples])).sum(-1))
    return out


_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words (the ``rouge-score`` package's tokenization, no stemming)."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) * len(b)))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference``: from the longest common word
    subsequence, precision ``lcs/len(candidate)``, recall ``lcs/len(reference)``; 0 when either is empty."""
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(cand, ref)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def extractive_answer(question: str, passages: Sequence[Passage]) -> str:
    """The cheap baseline answer: of the passage sharing the most words with ``question``
    (the top one on a tie, as a retriever ranks them), the sentence with the highest ROUGE-L
    against the question (the first on a tie); "" without passages."""
    if not passages:
        return ""
    words = set(rouge_tokens(question))
    top = max(passages, key=lambda p: (len(words & set(rouge_tokens(p.text))), -passages.index(p)))
    sentences = [s for s in _SENTENCE_END.split(top.text) if s.strip()]
    return max(sentences, key=lambda s: (rouge_l(s, question), -sentences.index(s)), default="")


def grounded_answers(
    models: dict[str, MambaLM],
    tokenizer: MambaTokenizer,
    examples: Sequence[SFTExample],
    max_new_tokens: int,
    batch_size: int = 32,
    max_questions: int | None = None,
) -> dict[str, Any]:
    """The grounded-answer table on ``examples`` whose prompt is a retrieval-grounded prompt:
    ``{"num_questions", "models": {name: {"non_empty_rate", "rouge_l"}}, "samples"}``, with the
    ``"extractive"`` baseline among the models. Each model reads ``<|bos|> prompt`` exactly as
    the server does and answers greedily; the answer is cut at the server's stop strings.
    ``max_questions``: the first ones only (None: all)."""
    by_prompt: dict[str, str] = {}
    for example in examples:
        if is_grounded_prompt(example.prompt):
            by_prompt.setdefault(example.prompt, example.response)
    prompts, references = list(by_prompt)[:max_questions], list(by_prompt.values())[:max_questions]
    answers: dict[str, list[str]] = {}
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    for name, lm in models.items():
        out: list[str] = []
        for start in range(0, len(ids), batch_size):
            new = generate_ids(lm, ids[start : start + batch_size], max_new_tokens, 0.0, 1.0, eos_id=tokenizer.eos_id)
            out += [cut_at_stop(tokenizer.decode(n), ANSWER_STOP) for n in new]
        answers[name] = out
    answers["extractive"] = [extractive_answer(*parse_grounded_prompt(p)) for p in prompts]
    table = {
        name: {
            "non_empty_rate": sum(1 for a in out if a) / max(1, len(out)),
            "rouge_l": sum(rouge_l(a, r) for a, r in zip(out, references)) / max(1, len(out)),
        }
        for name, out in answers.items()
    }
    samples = [
        {"question": parse_grounded_prompt(p)[0], "reference": r, **{name: answers[name][i] for name in answers}}
        for i, (p, r) in enumerate(zip(prompts, references))
    ]
    return {"num_questions": len(prompts), "models": table, "samples": samples}


def reward_model_pair_metrics(reward_model, examples: Sequence[PreferenceExample], fmt: PromptFormat, batch_size: int = 32) -> dict[str, float]:
    """The reward model's pairwise accuracy / loss / margin on ``examples``, for either backbone."""
    if getattr(reward_model, "backbone", "mamba") == "encoder":
        from src.rlhf.reward_encoder import evaluate_text_pairs

        return evaluate_text_pairs(reward_model, examples, batch_size)
    return evaluate_pairs(reward_model, PreferenceDataset(examples, fmt), fmt.tokenizer.pad_id, batch_size)


def evaluate_rlhf(
    sft_lm: MambaLM,
    policies: dict[str, MambaLM],
    reward_model,
    tokenizer: MambaTokenizer,
    test_examples: Sequence[SFTExample],
    preference_test_examples: Sequence[PreferenceExample],
    stage: StageConfig,
    kl_target: float,
    base_lm: MambaLM | None = None,
    training_curve: Sequence[dict[str, Any]] = (),
    dpo_config: Any = None,
) -> dict[str, Any]:
    """Compare each aligned policy (``{"ppo": lm, "dpo": lm}``, either or both) with ``sft_lm``
    (SFT, also the KL reference) on the **test** prompts and preferences, which no stage trained
    on or selected with.

    ``stage.training`` is an :class:`EvaluationConfig`; ``stage.output_file`` is
    ``evaluation.json`` (``evaluation.md`` and ``evaluation.png`` go beside it).
    ``training_curve``: PPO's per-iteration records, for the plot; ``dpo_config``: the
    :class:`DPOConfig` (beta) for DPO's implicit-reward accuracy. Returns ``{"metrics", "outputs"}``.
    """
    cfg: EvaluationConfig = stage.training
    log = setup_logging(KIND, stage.paths.log_dir)
    device = resolve_device(stage.system.device)
    seed_everything(stage.system.seed)
    models = {"sft": sft_lm.to(device).eval(), **{name: lm.to(device).eval() for name, lm in policies.items()}}
    preference_test_examples = list(preference_test_examples)[: cfg.num_pairs]
    reward_model = reward_model.to(device).eval()
    fmt = PromptFormat(tokenizer, stage.model.prompt_template, stage.model.max_prompt_tokens, stage.model.max_response_tokens)

    # One reference response per distinct test prompt.
    by_prompt: dict[str, str] = {}
    for example in test_examples:
        by_prompt.setdefault(example.prompt, example.response)
    prompt_texts = list(by_prompt)[: cfg.num_prompts]
    prompts = [fmt.prompt_ids(p) for p in prompt_texts]
    log.info("evaluation: %d test prompts, %d new tokens at most, temperature %.2f", len(prompts), cfg.max_new_tokens, cfg.temperature)

    responses = {name: sample_responses(lm, prompts, cfg, tokenizer.eos_id, stage.system.seed) for name, lm in models.items()}
    scores, truncated = {}, {}
    for name, resp in responses.items():
        scores[name], truncated[name] = reward_scores(reward_model, prompts, resp, tokenizer)
    reference_responses = [fmt.response_ids(by_prompt[p]) for p in prompt_texts]
    scores["reference"], _ = reward_scores(reward_model, prompts, reference_responses, tokenizer)

    sft_set = SFTDataset(test_examples, fmt)
    perplexity = {name: evaluate_response_loss(lm, sft_set, tokenizer.pad_id, cfg.batch_size)["val_perplexity"] for name, lm in models.items()}
    if base_lm is not None:
        perplexity["base"] = evaluate_response_loss(base_lm.to(device).eval(), sft_set, tokenizer.pad_id, cfg.batch_size)["val_perplexity"]
    rm_pairs = reward_model_pair_metrics(reward_model, preference_test_examples, fmt, cfg.batch_size)
    baselines = preference_baselines(preference_test_examples, cfg.cosine_baseline_model)

    def std_error(values: torch.Tensor) -> float:
        return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")

    metrics: dict[str, Any] = {
        "split": "test",
        "num_prompts": len(prompts),
        "reward_sft_mean": float(scores["sft"].mean()),
        "reward_sft_stderr": std_error(scores["sft"]),
        "reward_reference_mean": float(scores["reference"].mean()),
        "response_length_sft": sum(len(r) for r in responses["sft"]) / max(1, len(prompts)),
        "truncated_rate_sft": float(truncated["sft"].float().mean()),
        "perplexity_sft": perplexity["sft"],
        "kl_target": kl_target,
        "reward_model_backbone": getattr(reward_model, "backbone", "mamba"),
        "reward_model_test_accuracy": rm_pairs["val_accuracy"],
        "reward_model_test_loss": rm_pairs["val_loss"],
        "reward_model_test_pairs": len(preference_test_examples),
        **{f"baseline_{name}_test_accuracy": value for name, value in baselines.items()},
    }
    for name in policies:
        kl = response_kl(models[name], models["sft"], prompts, responses[name], tokenizer.pad_id, cfg.temperature, cfg.batch_size)
        tokens = sum(len(r) for r in responses[name])
        metrics.update({
            f"reward_{name}_mean": float(scores[name].mean()),
            f"reward_{name}_stderr": std_error(scores[name]),
            f"reward_gain_{name}": float(scores[name].mean() - scores["sft"].mean()),
            f"{name}_win_rate_vs_sft": win_rate(scores[name], scores["sft"]),
            f"{name}_beats_sft": bool(scores[name].mean() > scores["sft"].mean()),
            f"kl_{name}_to_reference": float(kl.mean()),
            f"kl_{name}_to_reference_per_token": float(kl.sum() / max(1, tokens)),
            f"response_length_{name}": tokens / max(1, len(prompts)),
            f"truncated_rate_{name}": float(truncated[name].float().mean()),
            f"perplexity_{name}": perplexity[name],
        })
    if "ppo" in policies:
        metrics["reward_gain"] = metrics["reward_gain_ppo"]
        metrics["kl_within_target"] = bool(metrics["kl_ppo_to_reference"] <= kl_target)
    if "dpo" in policies and dpo_config is not None:
        from src.rlhf.dpo import implicit_reward_accuracy

        implicit = implicit_reward_accuracy(models["dpo"], models["sft"], preference_test_examples, fmt, dpo_config, cfg.batch_size)
        metrics["dpo_implicit_reward_test_accuracy"] = implicit["val_reward_accuracy"]
        metrics["dpo_implicit_reward_test_margin"] = implicit["val_reward_margin"]
    if "base" in perplexity:
        metrics["perplexity_base"] = perplexity["base"]

    grounded_models = ({"base": base_lm} if base_lm is not None else {}) | models
    grounded = grounded_answers(grounded_models, tokenizer, test_examples, stage.model.max_response_tokens, cfg.batch_size, cfg.num_prompts)
    metrics["grounded_num_questions"] = grounded["num_questions"]
    for name, row in grounded["models"].items():
        metrics[f"grounded_{name}_non_empty_rate"] = row["non_empty_rate"]
        metrics[f"grounded_{name}_rouge_l"] = row["rouge_l"]

    samples = []
    for i in range(min(cfg.samples_in_report, len(prompts))):
        sample = {"prompt": prompt_texts[i], "reference": by_prompt[prompt_texts[i]], "reference_reward": float(scores["reference"][i])}
        for name in models:
            sample[name] = tokenizer.decode(responses[name][i])
            sample[f"{name}_reward"] = float(scores[name][i])
        samples.append(sample)
    json_path = Path(stage.output_file)
    grounded_report = {"num_questions": grounded["num_questions"], "models": grounded["models"],
                       "samples": grounded["samples"][: cfg.samples_in_report]}
    atomic_write_json(json_path, {"metrics": metrics, "samples": samples, "grounded_answers": grounded_report,
                                  "config": json.loads(stage.model_dump_json())})
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, render_report(metrics, samples, list(policies), grounded_report))
    png_path = json_path.with_suffix(".png")
    plot_evaluation(png_path, training_curve, {k: scores[k] for k in ("sft", *policies, "reference")}, kl_target)
    log.info(
        "test split: reward model accuracy %.3f (length %.3f, cosine %s) | %s",
        metrics["reward_model_test_accuracy"], baselines["length"],
        f"{baselines['cosine']:.3f}" if "cosine" in baselines else "-",
        " | ".join(f"{n.upper()} reward {metrics[f'reward_{n}_mean']:.3f} vs SFT {metrics['reward_sft_mean']:.3f}, "
                   f"win rate {metrics[f'{n}_win_rate_vs_sft']:.3f}, KL {metrics[f'kl_{n}_to_reference']:.3f}" for n in policies),
    )
    return {"metrics": metrics, "outputs": {"evaluation_json": str(json_path), "evaluation_md": str(md_path), "evaluation_png": str(png_path)}}


def render_report(metrics: dict[str, Any], samples: Sequence[dict[str, Any]], policies: Sequence[str] = ("ppo",),
                  grounded: dict[str, Any] | None = None) -> str:
    """The Markdown report of :func:`evaluate_rlhf`'s metrics and example answers."""
    m = metrics
    names = ["sft", *policies]
    label = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO"}

    def row(title: str, fmt_cell) -> str:
        return f"| {title} | " + " | ".join(fmt_cell(n) for n in names) + " |"

    lines = [
        "# RLHF evaluation (test split)",
        "",
        f"{m['num_prompts']} test prompts (never trained on, never used to select anything); one sampled answer "
        "per prompt from each model. Rewards are the reward model's normalized scores (0 = the mean score of "
        "human-preferred training answers).",
        "",
        "## Reward model vs cheap baselines",
        "",
        f"Pairwise accuracy on {m['reward_model_test_pairs']} test preference pairs (ties count half):",
        "",
        "| ranker | test accuracy |",
        "|---|---:|",
        f"| **reward model ({m['reward_model_backbone']})** | **{m['reward_model_test_accuracy']:.3f}** |",
    ]
    for name in ("cosine", "length", "random"):
        key = f"baseline_{name}_test_accuracy"
        if key in m:
            desc = {"cosine": "zero-shot cosine(prompt, answer), MiniLM", "length": "longer answer wins", "random": "random"}[name]
            lines.append(f"| {desc} | {m[key]:.3f} |")
    if "dpo_implicit_reward_test_accuracy" in m:
        lines.append(f"| DPO implicit reward β·log(π/π_ref) | {m['dpo_implicit_reward_test_accuracy']:.3f} |")
    lines += [
        "",
        "## Aligned policies vs SFT",
        "",
        "| metric | " + " | ".join(label[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
        row("mean reward (± std. error)", lambda n: f"{m[f'reward_{n}_mean']:.3f} ± {m[f'reward_{n}_stderr']:.3f}"),
        row("win rate vs SFT", lambda n: "-" if n == "sft" else f"**{m[f'{n}_win_rate_vs_sft']:.3f}**"),
        row("KL to SFT (nats / answer)", lambda n: "0 (reference)" if n == "sft" else f"{m[f'kl_{n}_to_reference']:.3f}"),
        row("answer perplexity, test references", lambda n: f"{m[f'perplexity_{n}']:.2f}"),
        row("mean answer length (tokens)", lambda n: f"{m[f'response_length_{n}']:.1f}"),
        row("answers cut off before <\\|eos\\|>", lambda n: f"{m[f'truncated_rate_{n}']:.1%}"),
        "",
        f"- Reference (dataset) answers' mean reward: {m['reward_reference_mean']:.3f}",
    ]
    if "kl_within_target" in m:
        lines.append(f"- PPO's KL is {'within' if m['kl_within_target'] else 'over'} its target ({m['kl_target']:g} nats)")
    if "perplexity_base" in m:
        lines.append(f"- Base model's answer perplexity on the test references: {m['perplexity_base']:.2f}")
    if samples:
        lines += ["", f"## {len(samples)} test prompts: answers and their rewards", "",
                  "| prompt | " + " | ".join(label[n] for n in names) + " | reference |",
                  "|---|" + "---|" * (len(names) + 1)]
        for s in samples:
            cells = [f"{_md(s[n])} ({s[f'{n}_reward']:+.2f})" for n in names]
            lines.append(f"| {_md(s['prompt'])} | " + " | ".join(cells) + f" | {_md(s['reference'])} ({s['reference_reward']:+.2f}) |")
    if grounded and grounded["num_questions"]:
        lines += render_grounded(grounded)
    return "\n".join(lines) + "\n"


def render_grounded(grounded: dict[str, Any]) -> list[str]:
    """The Markdown lines of the grounded-answer table (:func:`grounded_answers`)."""
    label = {"base": "base", "sft": "SFT", "ppo": "PPO", "dpo": "DPO", "extractive": "extractive baseline"}
    lines = [
        "", "## Grounded answers (what `/query` and the LangChain graph serve)", "",
        f"{grounded['num_questions']} test questions in the server's `Context: ... Question: ... Answer:` prompt "
        "(the answer's documentation section and a distractor from another module), read as the server reads "
        "them; greedy answers cut at the server's stop strings. ROUGE-L F1 against the reference answer; the "
        "extractive baseline answers with the best-matching sentence of the passage that best matches the question.",
        "",
        "| answerer | non-empty answers | ROUGE-L |",
        "|---|---:|---:|",
    ]
    for name, row in grounded["models"].items():
        lines.append(f"| {label.get(name, name)} | {row['non_empty_rate']:.1%} | {row['rouge_l']:.3f} |")
    names = list(grounded["models"])
    if grounded.get("samples"):
        lines += ["", "| question | " + " | ".join(label.get(n, n) for n in names) + " | reference |",
                  "|---|" + "---|" * (len(names) + 1)]
        for s in grounded["samples"]:
            lines.append(f"| {_md(s['question'])} | " + " | ".join(_md(s[n]) for n in names) + f" | {_md(s['reference'])} |")
    return lines


def _md(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def plot_evaluation(path: Path, training_curve: Sequence[dict[str, Any]], scores: dict[str, torch.Tensor], kl_target: float) -> Path:
    """PNG: PPO's score and KL per iteration (left) and the held-out score histograms (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if training_curve:
        steps = [r["step"] for r in training_curve]
        left.plot(steps, [r["score"] for r in training_curve], label="reward-model score", color="tab:blue")
        left.set_xlabel("PPO iteration")
        left.set_ylabel("mean normalized score")
        kl_axis = left.twinx()
        kl_axis.plot(steps, [r["kl"] for r in training_curve], label="KL to reference", color="tab:red")
        kl_axis.axhline(kl_target, color="tab:red", linestyle=":", label="KL target")
        kl_axis.set_ylabel("KL (nats / response)")
        lines = left.get_legend_handles_labels()[0] + kl_axis.get_legend_handles_labels()[0]
        left.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    left.set_title("PPO training")
    for name, values in scores.items():
        right.hist(values.numpy(), bins=20, alpha=0.5, label=f"{name} (mean {float(values.mean()):.2f})")
    right.set_xlabel("normalized reward-model score, held-out prompts")
    right.set_ylabel("responses")
    right.set_title("Held-out rewards")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
