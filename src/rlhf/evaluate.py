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
* **perplexity** of the reference answers under base, SFT and the policies.

Writes ``evaluation.json`` (every number), ``evaluation.md`` (the tables, and the answers of
SFT, PPO and DPO to ``samples_in_report`` test prompts with their rewards) and
``evaluation.png`` (PPO's training curve and the score distributions).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from src.core.checkpoint import atomic_write_json, atomic_write_text
from src.core.logging import setup_logging
from src.core.runtime import resolve_device, seed_everything
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

    samples = []
    for i in range(min(cfg.samples_in_report, len(prompts))):
        sample = {"prompt": prompt_texts[i], "reference": by_prompt[prompt_texts[i]], "reference_reward": float(scores["reference"][i])}
        for name in models:
            sample[name] = tokenizer.decode(responses[name][i])
            sample[f"{name}_reward"] = float(scores[name][i])
        samples.append(sample)
    json_path = Path(stage.output_file)
    atomic_write_json(json_path, {"metrics": metrics, "samples": samples, "config": json.loads(stage.model_dump_json())})
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, render_report(metrics, samples, list(policies)))
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


def render_report(metrics: dict[str, Any], samples: Sequence[dict[str, Any]], policies: Sequence[str] = ("ppo",)) -> str:
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
    return "\n".join(lines) + "\n"


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
