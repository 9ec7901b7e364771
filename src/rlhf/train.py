"""The RLHF recipe on MARK's Mamba LM: SFT -> reward model -> PPO -> evaluation -> export.

:func:`run` takes a loaded :class:`RLHFConfig` and runs the stages in order, each from its
own module (``sft.py``, ``reward_model.py``, ``ppo.py``, ``evaluate.py``, ``export.py``).
Outputs in ``paths.checkpoint_dir``: ``sft_model.pt``, ``reward_model.pt``, ``ppo_policy.pt``,
``evaluation.json`` / ``.md`` / ``.png``, ``rlhf_final_model.pt``, ``rlhf_summary.json``;
each trained stage's checkpoints under ``<checkpoint_dir>/<stage>/``; logs under
``logs/rlhf/<stage>/``. ``skip_sft`` / ``skip_reward`` load the stage's earlier output;
``resume`` reuses every output made with the same settings and inputs and continues an
interrupted stage from its latest checkpoint. Run it with ``python -m src.training.rlhf_pipeline``.
"""


from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from src.core.checkpoint import atomic_write_json, file_sha256, load_checkpoint
from src.core.config import PathsConfig, config_to_dict, save_config
from src.core.errors import CheckpointError, MarkError
from src.core.logging import get_logger, setup_logging
from src.core.runtime import resolve_device
from src.data.readers import read_preferences, read_sft
from src.mamba.load import load_mamba, resolve_checkpoint
from src.rlhf.checkpoints import file_record, finished_output, output_metrics, require_output
from src.rlhf.config import RLHFConfig, StageConfig
from src.rlhf.evaluate import evaluate_rlhf
from src.rlhf.export import export_rlhf_model
from src.rlhf.load import FINAL_MODEL
from src.rlhf.ppo import train_ppo
from src.rlhf.reward_model import KIND as REWARD_KIND
from src.rlhf.reward_model import load_reward_model, train_reward_model
from src.rlhf.sft import train_sft

log = get_logger("rlhf")


def run(
    cfg: RLHFConfig, resume: bool = False, evaluate: bool = False, skip_sft: bool = False, skip_reward: bool = False
) -> dict[str, Any]:
    """Run every stage with a loaded config: ``{"metrics": {stage: ...}, "outputs": {name: path}}``.

    ``evaluate`` is accepted for the common entry-point signature: evaluation always runs.
    """
    threads_before = torch.get_num_threads()
    if cfg.training.torch_threads:
        torch.set_num_threads(cfg.training.torch_threads)
    try:
        return _run_stages(cfg, resume, skip_sft, skip_reward)
    finally:
        torch.set_num_threads(threads_before)  # the full pipeline trains other components in this process


def _run_stages(cfg: RLHFConfig, resume: bool, skip_sft: bool, skip_reward: bool) -> dict[str, Any]:
    out, logs = Path(cfg.paths.checkpoint_dir), Path(cfg.paths.log_dir)
    resolve_device(cfg.system.device)  # a bad device fails before any work
    files = {
        "sft_model": out / "sft_model.pt",
        "reward_model": out / "reward_model.pt",
        "ppo_policy": out / "ppo_policy.pt",
        "evaluation": out / "evaluation.json",
        "rlhf_final_model": out / FINAL_MODEL,
    }
    # Check what this run will need from earlier runs before any work is done.
    if skip_sft:
        require_output(files["sft_model"], "SFT", "--skip-sft")
    if skip_reward:
        require_output(files["reward_model"], "reward-model", "--skip-reward")
    needs_base = not skip_sft or (not skip_reward and cfg.training.reward.init_from == "base")
    if needs_base:
        base_file = resolve_checkpoint(cfg.model.base_checkpoint)  # missing: the error names the training command
    else:  # only for the base model's perplexity in the report
        base_file = _existing_base(cfg.model.base_checkpoint)
    sft_train, sft_val = read_sft(cfg.data.sft_train_file), read_sft(cfg.data.sft_val_file)
    pref_train, pref_val = read_preferences(cfg.data.preferences_train_file), read_preferences(cfg.data.preferences_val_file)
    data_sha = {name: file_sha256(p) for name, p in cfg.data.model_dump().items()}

    _pipeline_logging(logs)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log.info("RLHF pipeline: base model %s, outputs in %s, logs in %s", base_file or "(not needed)", out, logs)
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def stage(name: str, training, output: Path, inputs: dict[str, str]) -> StageConfig:
        return StageConfig(
            stage=name, training=training, model=cfg.model, system=cfg.system, output_file=output, inputs=inputs,
            paths=PathsConfig(checkpoint_dir=out / name, log_dir=logs / name),
        )

    def timed(name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        result = work()
        timings[name] = round(time.perf_counter() - started, 1)
        _pipeline_logging(logs)
        log.info("stage %s: %.1f s", name, timings[name])
        return result

    # 1. SFT
    if skip_sft:
        metrics["sft"] = output_metrics(files["sft_model"], "mamba")
        log.info("--skip-sft: using %s", files["sft_model"])
    else:
        sft_stage = stage("sft", cfg.training.sft, files["sft_model"],
                          {"base_model": file_sha256(base_file), "sft_train": data_sha["sft_train_file"], "sft_val": data_sha["sft_val_file"]})
        metrics["sft"] = _reuse_or(resume, files["sft_model"], sft_stage, "mamba") or timed(
            "sft", lambda: train_sft(*load_mamba(base_file), sft_train, sft_val, sft_stage, resume))["metrics"]

    # 2. Reward model
    if skip_reward:
        metrics["reward"] = output_metrics(files["reward_model"], REWARD_KIND)
        log.info("--skip-reward: using %s", files["reward_model"])
    else:
        backbone_file = files["sft_model"] if cfg.training.reward.init_from == "sft" else base_file
        rm_stage = stage("reward", cfg.training.reward, files["reward_model"],
                         {"backbone": file_sha256(backbone_file), "preferences_train": data_sha["preferences_train_file"],
                          "preferences_val": data_sha["preferences_val_file"]})
        metrics["reward"] = _reuse_or(resume, files["reward_model"], rm_stage, REWARD_KIND) or timed(
            "reward", lambda: train_reward_model(*load_mamba(backbone_file), pref_train, pref_val, rm_stage, resume))["metrics"]

    # 3. PPO: policy and frozen reference both start as the SFT model.
    ppo_stage = stage("ppo", cfg.training.ppo, files["ppo_policy"],
                      {"sft_model": file_sha256(files["sft_model"]), "reward_model": file_sha256(files["reward_model"]),
                       "sft_train": data_sha["sft_train_file"]})

    def run_ppo() -> dict[str, Any]:
        policy_lm, tokenizer = load_mamba(files["sft_model"])
        reference, _ = load_mamba(files["sft_model"])
        reward_model, rm_tokenizer = load_reward_model(files["reward_model"])
        _check_same_tokenizer(tokenizer, rm_tokenizer, files)
        prompts = list(dict.fromkeys(e.prompt for e in sft_train))
        return train_ppo(policy_lm, reference, reward_model, tokenizer, prompts, ppo_stage, resume)

    metrics["ppo"] = _reuse_or(resume, files["ppo_policy"], ppo_stage, "mamba") or timed("ppo", run_ppo)["metrics"]

    # 4. Evaluation (always: it is what the run reports).
    def run_evaluation() -> dict[str, Any]:
        sft_lm, tokenizer = load_mamba(files["sft_model"])
        policy_lm, _ = load_mamba(files["ppo_policy"])
        reward_model, rm_tokenizer = load_reward_model(files["reward_model"])
        _check_same_tokenizer(tokenizer, rm_tokenizer, files)
        base_lm = load_mamba(base_file)[0] if base_file is not None else None
        curve = load_checkpoint(files["ppo_policy"], kind="mamba").get("history") or []
        eval_stage = stage("evaluation", cfg.evaluation, files["evaluation"], {"ppo_policy": file_sha256(files["ppo_policy"])})
        return evaluate_rlhf(sft_lm, policy_lm, reward_model, tokenizer, sft_val, pref_val, eval_stage,
                             cfg.training.ppo.kl.target, base_lm, curve)

    metrics["evaluation"] = timed("evaluation", run_evaluation)["metrics"]

    # 5. Export, with where every stage's output came from.
    provenance = {name: file_record(files[name]) for name in ("sft_model", "reward_model", "ppo_policy", "evaluation")}
    if base_file is not None:
        provenance["base_model"] = file_record(base_file)
    provenance["data"] = {name: {"path": str(p), "sha256": data_sha[name]} for name, p in cfg.data.model_dump().items()}
    export = timed("export", lambda: export_rlhf_model(files["ppo_policy"], files["rlhf_final_model"], config_to_dict(cfg), metrics, provenance))
    metrics["export"] = export["metrics"]

    summary = {
        "metrics": metrics,
        "outputs": {**{k: str(v) for k, v in files.items()}, "evaluation_md": str(files["evaluation"].with_suffix(".md")),
                    "evaluation_png": str(files["evaluation"].with_suffix(".png")), "log_dir": str(logs)},
        "seconds": timings,
    }
    atomic_write_json(out / "rlhf_summary.json", summary)
    ev = metrics["evaluation"]
    log.info(
        "RLHF done in %.0f s: held-out reward PPO %.3f vs SFT %.3f, win rate %.3f, KL %.3f (target %g): %s",
        sum(timings.values()), ev["reward_ppo_mean"], ev["reward_sft_mean"], ev["ppo_win_rate_vs_sft"],
        ev["kl_ppo_to_reference"], ev["kl_target"], files["rlhf_final_model"],
    )
    return summary


def _reuse_or(resume: bool, output: Path, stage: StageConfig, kind: str) -> dict[str, Any] | None:
    """With ``--resume``, the metrics of ``output`` when it was made by exactly ``stage``."""
    if not resume:
        return None
    record = finished_output(output, stage, kind)
    if record is not None:
        log.info("--resume: %s is up to date (same settings and inputs); not retraining", output)
        return record.get("metrics", {})
    return None


def _check_same_tokenizer(policy_tokenizer, reward_tokenizer, files: dict[str, Path]) -> None:
    if policy_tokenizer.fingerprint() != reward_tokenizer.fingerprint():
        raise CheckpointError(
            f"{files['reward_model']} uses another tokenizer than {files['sft_model']}: retrain the reward model "
            "(run without --skip-reward)"
        )


def _existing_base(path: Path) -> Path | None:
    try:
        return resolve_checkpoint(path)
    except MarkError:
        return None


def _pipeline_logging(log_dir: Path) -> None:
    setup_logging("rlhf", log_dir)
