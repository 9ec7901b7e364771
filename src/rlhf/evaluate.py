"""Stage 4, evaluation on held-out prompts: did PPO make responses the reward model prefers,
and at what distance from the SFT model?

For every held-out prompt (``data.sft_val_file``, never seen in SFT, RM or PPO training) the
SFT model and the PPO policy each sample one response with the same settings and seed. Then:

* **reward**: the reward model's normalized score of each response; mean for SFT and PPO,
  and for the dataset's reference responses as an anchor;
* **win rate**: share of prompts where PPO's response outscores SFT's (ties count half);
* **KL(PPO || reference)**: mean over prompts of the summed per-token log-ratio of PPO's
  response under the policy and under the reference (= the SFT model), in nats per response;
  compared with the configured target;
* **held-out perplexity** of the reference responses (response tokens only) under the base,
  SFT and PPO models, and the reward model's pairwise accuracy on held-out preferences.

Writes ``evaluation.json`` (every number), ``evaluation.md`` (a report with example
responses) and ``evaluation.png`` (PPO's training curve and the score distributions).
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
from src.rlhf.reward_model import RewardModel, evaluate_pairs
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


def evaluate_rlhf(
    sft_lm: MambaLM,
    policy_lm: MambaLM,
    reward_model: RewardModel,
    tokenizer: MambaTokenizer,
    val_examples: Sequence[SFTExample],
    preference_val_examples: Sequence[PreferenceExample],
    stage: StageConfig,
    kl_target: float,
    base_lm: MambaLM | None = None,
    training_curve: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Compare ``policy_lm`` (PPO) with ``sft_lm`` (SFT, also the KL reference) on held-out prompts.

    ``stage.training`` is an :class:`EvaluationConfig`; ``stage.output_file`` is
    ``evaluation.json`` (``evaluation.md`` and ``evaluation.png`` go beside it).
    ``training_curve``: PPO's per-iteration records, for the plot. Returns
    ``{"metrics": ..., "outputs": ...}``.
    """
    cfg: EvaluationConfig = stage.training
    log = setup_logging(KIND, stage.paths.log_dir)
    device = resolve_device(stage.system.device)
    seed_everything(stage.system.seed)
    models = {"sft": sft_lm.to(device).eval(), "ppo": policy_lm.to(device).eval()}
    reward_model = reward_model.to(device).eval()
    fmt = PromptFormat(tokenizer, stage.model.prompt_template, stage.model.max_prompt_tokens, stage.model.max_response_tokens)

    # One reference response per distinct held-out prompt.
    by_prompt: dict[str, str] = {}
    for example in val_examples:
        by_prompt.setdefault(example.prompt, example.response)
    prompt_texts = list(by_prompt)[: cfg.num_prompts]
    prompts = [fmt.prompt_ids(p) for p in prompt_texts]
    log.info("evaluation: %d held-out prompts, %d new tokens at most, temperature %.2f", len(prompts), cfg.max_new_tokens, cfg.temperature)

    responses = {name: sample_responses(lm, prompts, cfg, tokenizer.eos_id, stage.system.seed) for name, lm in models.items()}
    scores, truncated = {}, {}
    for name, resp in responses.items():
        scores[name], truncated[name] = reward_scores(reward_model, prompts, resp, tokenizer)
    reference_responses = [fmt.response_ids(by_prompt[p]) for p in prompt_texts]
    scores["reference"], _ = reward_scores(reward_model, prompts, reference_responses, tokenizer)
    kl = response_kl(models["ppo"], models["sft"], prompts, responses["ppo"], tokenizer.pad_id, cfg.temperature, cfg.batch_size)
    ppo_tokens = sum(len(r) for r in responses["ppo"])

    sft_set = SFTDataset(val_examples, fmt)
    perplexity = {name: evaluate_response_loss(lm, sft_set, tokenizer.pad_id, cfg.batch_size)["val_perplexity"] for name, lm in models.items()}
    if base_lm is not None:
        perplexity["base"] = evaluate_response_loss(base_lm.to(device).eval(), sft_set, tokenizer.pad_id, cfg.batch_size)["val_perplexity"]
    rm_pairs = evaluate_pairs(reward_model, PreferenceDataset(preference_val_examples, fmt), tokenizer.pad_id, cfg.batch_size)

    def std_error(values: torch.Tensor) -> float:
        return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")

    metrics: dict[str, Any] = {
        "num_prompts": len(prompts),
        "reward_ppo_mean": float(scores["ppo"].mean()),
        "reward_ppo_stderr": std_error(scores["ppo"]),
        "reward_sft_mean": float(scores["sft"].mean()),
        "reward_sft_stderr": std_error(scores["sft"]),
        "reward_reference_mean": float(scores["reference"].mean()),
        "reward_gain": float(scores["ppo"].mean() - scores["sft"].mean()),
        "ppo_win_rate_vs_sft": win_rate(scores["ppo"], scores["sft"]),
        "kl_ppo_to_reference": float(kl.mean()),
        "kl_ppo_to_reference_per_token": float(kl.sum() / max(1, ppo_tokens)),
        "kl_target": kl_target,
        "kl_within_target": bool(float(kl.mean()) <= kl_target),
        "ppo_beats_sft": bool(scores["ppo"].mean() > scores["sft"].mean()),
        "response_length_ppo": ppo_tokens / max(1, len(prompts)),
        "response_length_sft": sum(len(r) for r in responses["sft"]) / max(1, len(prompts)),
        "truncated_rate_ppo": float(truncated["ppo"].float().mean()),
        "truncated_rate_sft": float(truncated["sft"].float().mean()),
        "perplexity_sft": perplexity["sft"],
        "perplexity_ppo": perplexity["ppo"],
        "reward_model_val_accuracy": rm_pairs["val_accuracy"],
        "reward_model_val_pairs": len(preference_val_examples),
    }
    if "base" in perplexity:
        metrics["perplexity_base"] = perplexity["base"]

    samples = [
        {
            "prompt": prompt_texts[i],
            "sft": tokenizer.decode(responses["sft"][i]),
            "sft_reward": float(scores["sft"][i]),
            "ppo": tokenizer.decode(responses["ppo"][i]),
            "ppo_reward": float(scores["ppo"][i]),
            "reference": by_prompt[prompt_texts[i]],
            "reference_reward": float(scores["reference"][i]),
        }
        for i in range(min(cfg.samples_in_report, len(prompts)))
    ]
    json_path = Path(stage.output_file)
    atomic_write_json(json_path, {"metrics": metrics, "samples": samples, "config": json.loads(stage.model_dump_json())})
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, render_report(metrics, samples))
    png_path = json_path.with_suffix(".png")
    plot_evaluation(png_path, training_curve, {k: scores[k] for k in ("sft", "ppo", "reference")}, kl_target)
    log.info(
        "held-out reward: PPO %.3f vs SFT %.3f (reference %.3f) | PPO win rate %.3f | KL %.3f nats (target %.1f) | perplexity SFT %.2f, PPO %.2f",
        metrics["reward_ppo_mean"], metrics["reward_sft_mean"], metrics["reward_reference_mean"],
        metrics["ppo_win_rate_vs_sft"], metrics["kl_ppo_to_reference"], kl_target, perplexity["sft"], perplexity["ppo"],
    )
    return {"metrics": metrics, "outputs": {"evaluation_json": str(json_path), "evaluation_md": str(md_path), "evaluation_png": str(png_path)}}


def render_report(metrics: dict[str, Any], samples: Sequence[dict[str, Any]]) -> str:
    """The Markdown report of :func:`evaluate_rlhf`'s metrics and example responses."""
    m = metrics
    verdict = "above" if m["ppo_beats_sft"] else "not above"
    kl_verdict = "within" if m["kl_within_target"] else "over"
    lines = [
        "# RLHF evaluation",
        "",
        f"{m['num_prompts']} held-out prompts; one sampled response per prompt from each model. "
        "Rewards are the reward model's normalized scores (0 = the mean score of human-preferred training responses).",
        "",
        f"PPO's mean reward is **{verdict}** SFT's; its KL to the reference is **{kl_verdict}** the target.",
        "",
        "| metric | SFT | PPO |",
        "|---|---:|---:|",
        f"| mean reward (± std. error) | {m['reward_sft_mean']:.3f} ± {m['reward_sft_stderr']:.3f} | {m['reward_ppo_mean']:.3f} ± {m['reward_ppo_stderr']:.3f} |",
        f"| KL to reference (nats / response) | 0 (is the reference) | {m['kl_ppo_to_reference']:.3f} (target {m['kl_target']:g}) |",
        f"| response perplexity, held-out references | {m['perplexity_sft']:.2f} | {m['perplexity_ppo']:.2f} |",
        f"| mean response length (tokens) | {m['response_length_sft']:.1f} | {m['response_length_ppo']:.1f} |",
        f"| responses cut off before <\\|eos\\|> | {m['truncated_rate_sft']:.1%} | {m['truncated_rate_ppo']:.1%} |",
        "",
        f"- PPO win rate over SFT under the reward model: **{m['ppo_win_rate_vs_sft']:.3f}**",
        f"- Reward gain PPO - SFT: {m['reward_gain']:+.3f}",
        f"- Reference (dataset) responses' mean reward: {m['reward_reference_mean']:.3f}",
        f"- KL per response token: {m['kl_ppo_to_reference_per_token']:.4f} nats",
        f"- Reward model pairwise accuracy on {m['reward_model_val_pairs']} held-out preference pairs: {m['reward_model_val_accuracy']:.3f}",
    ]
    if "perplexity_base" in m:
        lines.append(f"- Base model's response perplexity on the held-out references: {m['perplexity_base']:.2f}")
    if samples:
        lines += ["", "## Example responses", ""]
        for s in samples:
            lines += [
                f"**{_md(s['prompt'])}**",
                "",
                f"- SFT ({s['sft_reward']:+.2f}): {_md(s['sft'])}",
                f"- PPO ({s['ppo_reward']:+.2f}): {_md(s['ppo'])}",
                f"- reference ({s['reference_reward']:+.2f}): {_md(s['reference'])}",
                "",
            ]
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
