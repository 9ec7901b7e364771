"""The RLHF recipe on MARK's Mamba LM: SFT -> reward model -> PPO and/or DPO -> evaluation -> export.

:func:`run` takes a loaded :class:`RLHFConfig` and runs the stages in order, each from its
own module (``sft.py``, ``reward_model.py`` or ``reward_encoder.py``, ``ppo.py``, ``dpo.py``,
``evaluate.py``, ``export.py``); ``training.method`` (``--method``) picks PPO, DPO or both.
Train splits train, val splits select checkpoints, the test splits are only reported.
Outputs in ``paths.checkpoint_dir``: ``sft_model.pt``, ``reward_model.pt``, ``ppo_policy.pt``,
``dpo_policy.pt``, ``evaluation.json`` / ``.md`` / ``.png``, ``rlhf_final_model.pt``, ``rlhf_summary.json``;
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
from src.mamba.load import is_pretrained_folder, load_mamba, load_start_model, resolve_checkpoint
from src.mamba.model import ADAPTER_REFUSED_TARGETS
from src.rlhf.checkpoints import file_record, finished_output, output_metrics, require_output
from src.rlhf.config import RLHFConfig, StageConfig
from src.rlhf.dpo import train_dpo
from src.rlhf.evaluate import evaluate_rlhf
from src.rlhf.export import export_rlhf_model
from src.rlhf.load import FINAL_MODEL, load_reward_model
from src.rlhf.ppo import train_ppo
from src.rlhf.reward_model import KIND as REWARD_KIND
from src.rlhf.reward_encoder import train_encoder_reward_model
from src.rlhf.reward_model import train_reward_model
from src.rlhf.sft import train_sft
from src.training.adapters import apply_adapter

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
        "dpo_policy": out / "dpo_policy.pt",
        "evaluation": out / "evaluation.json",
        "rlhf_final_model": out / FINAL_MODEL,
    }
    # Check what this run will need from earlier runs before any work is done.
    if skip_sft:
        require_output(files["sft_model"], "SFT", "--skip-sft")
    if skip_reward:
        require_output(files["reward_model"], "reward-model", "--skip-reward")
    reward_cfg = cfg.training.reward
    methods = ("ppo", "dpo") if cfg.training.method == "both" else (cfg.training.method,)
    needs_base = not skip_sft or (not skip_reward and reward_cfg.backbone == "mamba" and reward_cfg.init_from == "base")
    if needs_base:  # a pretrained folder, or a MARK checkpoint (missing: the error names the training command)
        base_file = _base_source(cfg.model.base_checkpoint)
    else:  # only for the base model's perplexity in the report
        base_file = _existing_base(cfg.model.base_checkpoint)
    sft_train, sft_val, sft_test = (read_sft(f) for f in (cfg.data.sft_train_file, cfg.data.sft_val_file, cfg.data.sft_test_file))
    pref_train, pref_val, pref_test = (
        read_preferences(f) for f in (cfg.data.preferences_train_file, cfg.data.preferences_val_file, cfg.data.preferences_test_file)
    )
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

    adapter = cfg.model.adapter

    def start(path: Path):
        """(model, tokenizer) a stage trains from ``path``; with ``model.adapter`` a fresh LoRA
        adapter on it (frozen, any adapter it had merged)."""
        model, tokenizer, record = load_start_model(path, cfg.model.tokenizer)
        if adapter is not None:
            apply_adapter(model, adapter, "model.adapter", ADAPTER_REFUSED_TARGETS, base=record, seed=cfg.system.seed)
        return model, tokenizer

    def reference(path: Path):
        """The frozen reference of PPO/DPO: with an adapter, none (the policy with its adapter disabled)."""
        return None if adapter is not None else load_mamba(path)[0]

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
                          {"base_model": _fingerprint(base_file), "sft_train": data_sha["sft_train_file"], "sft_val": data_sha["sft_val_file"]})
        metrics["sft"] = _reuse_or(resume, files["sft_model"], sft_stage, "mamba") or timed(
            "sft", lambda: train_sft(*start(base_file), sft_train, sft_val, sft_stage, resume))["metrics"]

    # 2. Reward model
    if skip_reward:
        metrics["reward"] = output_metrics(files["reward_model"], REWARD_KIND)
        log.info("--skip-reward: using %s", files["reward_model"])
    elif reward_cfg.backbone == "encoder":  # a pretrained encoder: needs neither SFT nor base
        rm_stage = stage("reward", reward_cfg, files["reward_model"],
                         {"encoder": reward_cfg.encoder_model, "preferences_train": data_sha["preferences_train_file"],
                          "preferences_val": data_sha["preferences_val_file"]})
        metrics["reward"] = _reuse_or(resume, files["reward_model"], rm_stage, REWARD_KIND) or timed(
            "reward", lambda: train_encoder_reward_model(pref_train, pref_val, rm_stage, resume))["metrics"]
    else:
        backbone_file = files["sft_model"] if reward_cfg.init_from == "sft" else base_file
        rm_stage = stage("reward", reward_cfg, files["reward_model"],
                         {"backbone": _fingerprint(backbone_file), "preferences_train": data_sha["preferences_train_file"],
                          "preferences_val": data_sha["preferences_val_file"]})
        metrics["reward"] = _reuse_or(resume, files["reward_model"], rm_stage, REWARD_KIND) or timed(
            "reward", lambda: train_reward_model(*start(backbone_file), pref_train, pref_val, rm_stage, resume))["metrics"]

    # 3. PPO: policy and frozen reference both start as the SFT model.
    if "ppo" in methods:
        ppo_stage = stage("ppo", cfg.training.ppo, files["ppo_policy"],
                          {"sft_model": file_sha256(files["sft_model"]), "reward_model": file_sha256(files["reward_model"]),
                           "sft_train": data_sha["sft_train_file"]})

        def run_ppo() -> dict[str, Any]:
            policy_lm, tokenizer = start(files["sft_model"])
            reward_model, rm_tokenizer = load_reward_model(files["reward_model"])
            _check_same_tokenizer(tokenizer, reward_model, rm_tokenizer, files)
            prompts = list(dict.fromkeys(e.prompt for e in sft_train))
            return train_ppo(policy_lm, reference(files["sft_model"]), reward_model, tokenizer, prompts, ppo_stage, resume)

        metrics["ppo"] = _reuse_or(resume, files["ppo_policy"], ppo_stage, "mamba") or timed("ppo", run_ppo)["metrics"]

    # 3b. DPO: the same start and reference; the preference pairs, or (pairs: sampled) the
    # SFT model's own answers ranked by the reward model.
    if "dpo" in methods:
        sampled = cfg.training.dpo.pairs == "sampled"
        dpo_inputs = {"sft_model": file_sha256(files["sft_model"]), "preferences_train": data_sha["preferences_train_file"],
                      "preferences_val": data_sha["preferences_val_file"]}
        if sampled:
            dpo_inputs["reward_model"] = file_sha256(files["reward_model"])
        dpo_stage = stage("dpo", cfg.training.dpo, files["dpo_policy"], dpo_inputs)

        def run_dpo() -> dict[str, Any]:
            policy_lm, tokenizer = start(files["sft_model"])
            reward_model = None
            if sampled:
                reward_model, rm_tokenizer = load_reward_model(files["reward_model"])
                _check_same_tokenizer(tokenizer, reward_model, rm_tokenizer, files)
            return train_dpo(policy_lm, reference(files["sft_model"]), tokenizer, pref_train, pref_val, dpo_stage, resume, reward_model)

        metrics["dpo"] = _reuse_or(resume, files["dpo_policy"], dpo_stage, "mamba") or timed("dpo", run_dpo)["metrics"]

    # 4. Evaluation on the test split (always: it is what the run reports).
    def run_evaluation() -> dict[str, Any]:
        sft_lm, tokenizer = load_mamba(files["sft_model"])
        policies = {name: load_mamba(files[f"{name}_policy"])[0] for name in methods}
        reward_model, rm_tokenizer = load_reward_model(files["reward_model"])
        _check_same_tokenizer(tokenizer, reward_model, rm_tokenizer, files)
        base_lm = load_start_model(base_file, cfg.model.tokenizer)[0] if base_file is not None else None
        curve = (load_checkpoint(files["ppo_policy"], kind="mamba").get("history") or []) if "ppo" in methods else []
        eval_stage = stage("evaluation", cfg.evaluation, files["evaluation"],
                           {f"{name}_policy": file_sha256(files[f"{name}_policy"]) for name in methods})
        return evaluate_rlhf(sft_lm, policies, reward_model, tokenizer, sft_test, pref_test, eval_stage,
                             cfg.training.ppo.kl.target, base_lm, curve, cfg.training.dpo)

    metrics["evaluation"] = timed("evaluation", run_evaluation)["metrics"]

    # 5. Export the served policy, with where every stage's output came from.
    exported = ("ppo" if "ppo" in methods else "dpo") if cfg.training.export == "auto" else cfg.training.export
    recorded = ("sft_model", "reward_model", *(f"{name}_policy" for name in methods), "evaluation")
    provenance = {name: file_record(files[name]) for name in recorded}
    if base_file is not None:
        provenance["base_model"] = {"path": str(base_file), "sha256": _fingerprint(base_file)}
    provenance["data"] = {name: {"path": str(p), "sha256": data_sha[name]} for name, p in cfg.data.model_dump().items()}
    provenance["exported_policy"] = exported
    export = timed("export", lambda: export_rlhf_model(files[f"{exported}_policy"], files["rlhf_final_model"], config_to_dict(cfg), metrics, provenance))
    metrics["export"] = {**export["metrics"], "policy": exported}

    summary = {
        "metrics": metrics,
        "outputs": {**{k: str(v) for k, v in files.items()}, "evaluation_md": str(files["evaluation"].with_suffix(".md")),
                    "evaluation_png": str(files["evaluation"].with_suffix(".png")), "log_dir": str(logs)},
        "seconds": timings,
    }
    atomic_write_json(out / "rlhf_summary.json", summary)
    ev = metrics["evaluation"]
    log.info(
        "RLHF done in %.0f s (test split): reward model accuracy %.3f | %s: %s",
        sum(timings.values()), ev["reward_model_test_accuracy"],
        " | ".join(f"{n.upper()} win rate vs SFT {ev[f'{n}_win_rate_vs_sft']:.3f}, KL {ev[f'kl_{n}_to_reference']:.3f}" for n in methods),
        files["rlhf_final_model"],
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


def _check_same_tokenizer(policy_tokenizer, reward_model, reward_tokenizer, files: dict[str, Path]) -> None:
    # An encoder reward model reads decoded text with its own tokenizer; a Mamba one reads the policy's ids.
    if getattr(reward_model, "backbone", "mamba") == "mamba" and policy_tokenizer.fingerprint() != reward_tokenizer.fingerprint():
        raise CheckpointError(
            f"{files['reward_model']} uses another tokenizer than {files['sft_model']}: retrain the reward model "
            "(run without --skip-reward)"
        )


def _base_source(path: Path) -> Path:
    """The base model's file, or the pretrained folder itself."""
    return Path(path) if is_pretrained_folder(path) else resolve_checkpoint(path)


def _existing_base(path: Path) -> Path | None:
    try:
        return _base_source(path)
    except MarkError:
        return None


def _fingerprint(path: Path) -> str:
    """sha256 of a checkpoint file, or of a pretrained folder's config and weight files (what a
    stage's output is reused for)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and (file.name == "config.json" or file.suffix in (".safetensors", ".bin") or file.name.endswith(".index.json")):
            digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _pipeline_logging(log_dir: Path) -> None:
    setup_logging("rlhf", log_dir)
