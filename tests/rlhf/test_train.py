"""The whole RLHF pipeline (src/training/rlhf_pipeline.py) at tiny size: every stage's output,
evaluation and export (src/rlhf/evaluate.py, src/rlhf/export.py), skip flags, resume,
determinism, config selection and command-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.core.checkpoint import file_sha256, load_checkpoint
from src.core.cli import run_cli
from src.core.errors import CheckpointError, ConfigError, NotTrainedError
from src.mamba.generate import generate
from src.rlhf.evaluate import win_rate
from src.rlhf.load import load_rlhf_model, read_rlhf_metadata
from src.training import rlhf_pipeline
from tests.rlhf.conftest import tiny_rlhf_config, write_yaml

REPO = Path(__file__).resolve().parents[2]
STAGE_FILES = ("sft_model.pt", "reward_model.pt", "ppo_policy.pt", "dpo_policy.pt", "evaluation.json", "evaluation.md",
               "evaluation.png", "rlhf_final_model.pt", "rlhf_summary.json", "config.yaml")


@pytest.fixture(scope="module")
def pipeline_run(tiny_base_model, tiny_encoder_dir, sample_data_dir, tmp_path_factory):
    """One full tiny run (encoder reward model, PPO and DPO): ``{"work", "config", "out", "summary"}``."""
    work = tmp_path_factory.mktemp("rlhf_run")
    config = write_yaml(work / "rlhf.yaml", tiny_rlhf_config(tiny_base_model, sample_data_dir, work, encoder=tiny_encoder_dir))
    summary = rlhf_pipeline.main(["--base-model", "mamba", "--config", str(config), "--device", "cpu", "--method", "both"])
    return {"work": work, "config": config, "out": work / "rlhf", "summary": summary}


def test_every_stage_writes_its_output(pipeline_run):
    out, logs = pipeline_run["out"], pipeline_run["work"] / "logs"
    for name in STAGE_FILES:
        assert (out / name).is_file(), name
    for stage in ("sft", "reward", "ppo", "dpo", "evaluation"):
        assert (logs / stage / "train.log").is_file(), stage
    for stage in ("sft", "reward", "ppo", "dpo"):
        assert (logs / stage / "metrics.jsonl").read_text().strip(), stage
    ppo_records = [json.loads(line) for line in (logs / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo_records] == [1, 2, 3]
    assert {"score", "kl", "kl_coef", "pg_loss", "vf_loss", "pg_clipfrac"} <= set(ppo_records[0])


def test_summary_and_evaluation_report_the_same_computed_numbers(pipeline_run):
    metrics = pipeline_run["summary"]["metrics"]
    assert set(metrics) == {"sft", "reward", "ppo", "dpo", "evaluation", "export"}
    evaluation = json.loads((pipeline_run["out"] / "evaluation.json").read_text())
    assert evaluation["metrics"] == metrics["evaluation"]
    ev = metrics["evaluation"]
    assert ev["split"] == "test" and ev["num_prompts"] == 8 and ev["reward_model_test_pairs"] == 24
    assert metrics["reward"]["backbone"] == ev["reward_model_backbone"] == "encoder"
    for name in ("ppo", "dpo"):
        assert 0.0 <= ev[f"{name}_win_rate_vs_sft"] <= 1.0 and ev[f"kl_{name}_to_reference"] == ev[f"kl_{name}_to_reference"]
        assert ev[f"reward_gain_{name}"] == pytest.approx(ev[f"reward_{name}_mean"] - ev["reward_sft_mean"])
        assert ev[f"perplexity_{name}"] > 1
    assert 0.0 <= ev["reward_model_test_accuracy"] <= 1.0 and 0.0 <= ev["dpo_implicit_reward_test_accuracy"] <= 1.0
    assert ev["baseline_random_test_accuracy"] == 0.5 and 0.0 <= ev["baseline_length_test_accuracy"] <= 1.0
    assert ev["baseline_cosine_test_accuracy"] > 0.6  # zero-shot MiniLM already ranks most test pairs right
    assert ev["kl_within_target"] == (ev["kl_ppo_to_reference"] <= ev["kl_target"])
    assert ev["perplexity_sft"] > 1 and ev["perplexity_base"] > 1
    assert metrics["sft"]["val_loss"] < metrics["sft"]["base_val_loss"]
    report = (pipeline_run["out"] / "evaluation.md").read_text()
    assert f"{ev['ppo_win_rate_vs_sft']:.3f}" in report and f"{ev['dpo_win_rate_vs_sft']:.3f}" in report
    assert f"{ev['baseline_cosine_test_accuracy']:.3f}" in report and "## 2 test prompts: answers and their rewards" in report
    assert len(evaluation["samples"]) == 2 and {"sft", "ppo", "dpo", "dpo_reward"} <= set(evaluation["samples"][0])
    # The grounded-answer table: what /query serves, for every model, beside the extractive baseline.
    grounded = evaluation["grounded_answers"]
    assert grounded["num_questions"] == ev["grounded_num_questions"] == 8
    assert set(grounded["models"]) == {"base", "sft", "ppo", "dpo", "extractive"}
    for name, row in grounded["models"].items():
        assert 0.0 <= row["non_empty_rate"] <= 1.0 and 0.0 <= row["rouge_l"] <= 1.0, name
        assert ev[f"grounded_{name}_rouge_l"] == row["rouge_l"]
        assert f"{row['rouge_l']:.3f}" in report
    assert grounded["models"]["extractive"]["non_empty_rate"] == 1.0 and grounded["models"]["extractive"]["rouge_l"] > 0.3
    assert "## Grounded answers" in report and len(grounded["samples"]) == 2


def test_exported_model_loads_generates_and_names_its_sources(pipeline_run):
    out = pipeline_run["out"]
    model, tokenizer = load_rlhf_model(out, "cpu")
    text = generate(model, tokenizer, "What does json.dumps do?\n", max_new_tokens=6, seed=0)
    assert isinstance(text, str)
    policy = load_checkpoint(out / "ppo_policy.pt", kind="mamba")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in policy["model"].items())
    meta = read_rlhf_metadata(out / "rlhf_final_model.pt")
    for name in ("sft_model", "reward_model", "ppo_policy", "evaluation"):
        assert meta["provenance"][name]["sha256"] == file_sha256(out / Path(meta["provenance"][name]["path"]).name)
    base = meta["provenance"]["base_model"]
    assert base["path"].endswith("best_model.pt") and base["sha256"] == file_sha256(base["path"])
    assert meta["metrics"]["evaluation"] == pipeline_run["summary"]["metrics"]["evaluation"]
    assert meta["config"]["training"]["ppo"]["num_steps"] == 3


def test_resume_reuses_finished_stages(pipeline_run):
    out = pipeline_run["out"]
    before = {name: file_sha256(out / name) for name in ("sft_model.pt", "reward_model.pt", "ppo_policy.pt", "dpo_policy.pt")}
    summary = rlhf_pipeline.main(["--config", str(pipeline_run["config"]), "--resume"])
    assert {name: file_sha256(out / name) for name in before} == before
    assert set(summary["seconds"]) == {"evaluation", "export"}  # nothing retrained


def test_ppo_resumes_exactly_from_its_checkpoint(pipeline_run, tmp_path):
    # Same SFT and reward model; 5 iterations straight vs 3, then --resume to 5.
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        for file in ("sft_model.pt", "reward_model.pt"):
            shutil.copy(pipeline_run["out"] / file, tmp_path / name / file)
    common = ["--config", str(pipeline_run["config"]), "--skip-sft", "--skip-reward"]
    rlhf_pipeline.main([*common, "--output-dir", str(tmp_path / "straight"), "--num-rl-steps", "5"])
    rlhf_pipeline.main([*common, "--output-dir", str(tmp_path / "resumed"), "--num-rl-steps", "3"])
    assert (tmp_path / "resumed" / "ppo" / "checkpoint_step_3.pt").is_file()
    rlhf_pipeline.main([*common, "--output-dir", str(tmp_path / "resumed"), "--num-rl-steps", "5", "--resume"])
    straight = load_checkpoint(tmp_path / "straight" / "ppo_policy.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "ppo_policy.pt")
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in resumed["history"]] == pytest.approx([h["score"] for h in straight["history"]])
    diff = max((straight["model"][k] - resumed["model"][k]).abs().max().item() for k in straight["model"])
    assert diff < 1e-6
    with pytest.raises(CheckpointError, match="past training.ppo.num_steps=4"):
        rlhf_pipeline.main([*common, "--output-dir", str(tmp_path / "resumed"), "--num-rl-steps", "4", "--resume"])


def test_two_identical_runs_give_identical_metrics(pipeline_run, tmp_path):
    """Same seed, same machine, same config: every number of the run is the same, exactly."""
    again = rlhf_pipeline.main(["--config", str(pipeline_run["config"]), "--output-dir", str(tmp_path / "again")])
    first = pipeline_run["summary"]["metrics"]
    assert again["metrics"] == first
    for name in ("sft_model.pt", "ppo_policy.pt", "dpo_policy.pt"):
        a, b = load_checkpoint(pipeline_run["out"] / name), load_checkpoint(tmp_path / "again" / name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


def test_dpo_only_run_exports_the_dpo_policy(pipeline_run, tmp_path):
    out = tmp_path / "dpo_only"
    for file in ("sft_model.pt", "reward_model.pt"):
        (out).mkdir(exist_ok=True)
        shutil.copy(pipeline_run["out"] / file, out / file)
    summary = rlhf_pipeline.main(["--config", str(pipeline_run["config"]), "--output-dir", str(out),
                                  "--skip-sft", "--skip-reward", "--method", "dpo"])
    assert "ppo" not in summary["metrics"] and not (out / "ppo_policy.pt").exists()
    assert summary["metrics"]["export"]["policy"] == "dpo" and "ppo_win_rate_vs_sft" not in summary["metrics"]["evaluation"]
    model, _ = load_rlhf_model(out, "cpu")
    dpo = load_checkpoint(out / "dpo_policy.pt", kind="mamba")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dpo["model"].items())
    with pytest.raises(ConfigError, match="export: ppo is not trained with method: dpo"):
        rlhf_pipeline.main(["--config", str(pipeline_run["config"]), "--method", "dpo", "training.export=ppo"])


def test_dpo_on_sampled_pairs_runs_through_the_pipeline(pipeline_run, tmp_path):
    """``training.dpo.pairs=sampled``: the DPO stage loads the reward model, ranks the SFT
    model's own answers with it, and records the pairs it trained on."""
    out = tmp_path / "sampled"
    out.mkdir()
    for file in ("sft_model.pt", "reward_model.pt"):
        shutil.copy(pipeline_run["out"] / file, out / file)
    summary = rlhf_pipeline.main(["--config", str(pipeline_run["config"]), "--output-dir", str(out), "--skip-sft",
                                  "--skip-reward", "--method", "dpo", "training.dpo.pairs=sampled", "training.dpo.num_samples=2"])
    dpo = summary["metrics"]["dpo"]
    assert dpo["pairs"] == "sampled" and dpo["sampled_pairs"]["train"]["pairs"] > 0
    assert dpo["sampled_pairs"]["train"]["chosen_score_mean"] > dpo["sampled_pairs"]["train"]["rejected_score_mean"]
    assert 0.0 <= summary["metrics"]["evaluation"]["dpo_win_rate_vs_sft"] <= 1.0


def test_skip_flags_need_the_earlier_outputs(rlhf_config_file, tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(CheckpointError, match="sft_model.pt.*without --skip-sft"):
        rlhf_pipeline.main(["--config", str(rlhf_config_file), "--output-dir", str(empty), "--skip-sft"])
    with pytest.raises(CheckpointError, match="reward_model.pt.*without --skip-reward"):
        rlhf_pipeline.main(["--config", str(rlhf_config_file), "--output-dir", str(empty), "--skip-reward"])
    assert not (empty / "config.yaml").exists()  # refused before writing anything


def test_missing_base_model_names_the_training_command(rlhf_config_file, tmp_path):
    with pytest.raises(NotTrainedError, match="python -m src.scripts.train_mamba --config configs/mamba_train.yaml"):
        rlhf_pipeline.main(["--config", str(rlhf_config_file), f"model.base_checkpoint={tmp_path / 'none.pt'}"])


def test_bad_key_is_one_line_and_exit_code_2(rlhf_config_file, capsys):
    assert run_cli(rlhf_pipeline.main, ["--config", str(rlhf_config_file), "training.ppo.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training.ppo.bogus: unknown key" in err
    assert run_cli(rlhf_pipeline.main, ["--config", str(rlhf_config_file), "training.ppo.clip_range=-1"]) == 2


def test_cli_subprocess_exits_2_on_a_bad_value(rlhf_config_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "src.training.rlhf_pipeline", "--config", str(rlhf_config_file), "training.ppo.num_steps=zero"],
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "training.ppo.num_steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_from_an_rlhf_section_or_the_rlhf_yaml_beside_it(tiny_base_model, sample_data_dir, tmp_path):
    rlhf = tiny_rlhf_config(tiny_base_model, sample_data_dir, tmp_path)
    rl_like = {"model": {"policy_model": "ppo"}, "env": {"id": "CartPole-v1"}}

    with_section = write_yaml(tmp_path / "with_section.yaml", {**rl_like, "rlhf": rlhf})
    cfg = rlhf_pipeline.load_rlhf_config(with_section, ["training.ppo.num_steps=7"])
    assert cfg.training.ppo.num_steps == 7 and cfg.model.base_checkpoint == tiny_base_model

    folder = tmp_path / "configs"
    folder.mkdir()
    without_section = write_yaml(folder / "rl_train.yaml", rl_like)
    write_yaml(folder / "rlhf.yaml", {**rlhf, "evaluation": {"num_prompts": 3}})
    assert rlhf_pipeline.load_rlhf_config(without_section).evaluation.num_prompts == 3

    with pytest.raises(ConfigError, match=r"\(rlhf section\): training.sft.nope: unknown key"):
        rlhf_pipeline.load_rlhf_config(with_section, ["training.sft.nope=1"])


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])) == pytest.approx(2.5 / 4)


def test_reward_scorer_scores_texts_with_either_backbone(pipeline_run, tiny_base_model, sample_data_dir, tmp_path):
    from src.rlhf.load import load_reward_scorer

    scorer = load_reward_scorer(pipeline_run["out"], "cpu")  # the encoder reward model of the run
    assert scorer.backbone == "encoder"
    scores = scorer.score(["What does json.dumps do?"] * 2, ["Serialize obj to a JSON formatted str.", "It does what its name says."])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] != scores[1]
    assert scorer.score([], []) == []

    # The Mamba backbone: a short run with only the reward stage's choice changed.
    config = write_yaml(tmp_path / "rlhf.yaml", tiny_rlhf_config(tiny_base_model, sample_data_dir, tmp_path))
    rlhf_pipeline.main(["--config", str(config), "--method", "dpo", "training.dpo.max_train_examples=8"])
    mamba_scorer = load_reward_scorer(tmp_path / "rlhf" / "reward_model.pt")
    assert mamba_scorer.backbone == "mamba"
    again = mamba_scorer.score(["What does json.dumps do?"], ["Serialize obj to a JSON formatted str."])
    assert len(again) == 1 and again == mamba_scorer.score(["What does json.dumps do?"], ["Serialize obj to a JSON formatted str."])
    with pytest.raises(NotTrainedError, match="no reward model"):
        load_reward_scorer(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def pretrained_hf_folder(sample_data_dir, tmp_path_factory) -> Path:
    """A tiny Mamba2ForCausalLM saved by transformers (save_pretrained) with a GPT-NeoX-style tokenizer."""
    from src.data.readers import read_documents
    from tests.mamba.pretrained_folders import save_hf_mamba2, save_neox_style_tokenizer

    root = tmp_path_factory.mktemp("pretrained_hf")
    texts = [d.text[:3000] for d in read_documents(sample_data_dir / "lm_train.jsonl")][:40]
    texts += [json.loads(line)["prompt"] + " " + json.loads(line)["response"]
              for line in (sample_data_dir / "sft_train.jsonl").read_text().splitlines()[:200]]
    tokenizer = save_neox_style_tokenizer(texts, root / "tokenizer", vocab_size=400)
    save_hf_mamba2(root / "hf", vocab_size=400, tied=True, n_groups=1, tokenizer=tokenizer)
    return root / "hf"


ADAPTER = {"r": 8, "alpha": 16, "target_modules": ["in_proj"]}


def lora_chain(pretrained_hf_folder: Path, sample_data_dir: Path, tmp_path: Path) -> dict:
    """A transformers Mamba-2 folder LoRA-tuned by ``--target=mamba``, then SFT, the Mamba reward
    model and DPO each with an adapter; returns the RLHF summary (outputs in ``tmp_path / "rlhf"``).
    Also run by ``make test-gguf`` (tests/mamba/test_export_llama_cpp.py) to put its GGUF in llama.cpp."""
    from src.training import orchestrator

    lm = tmp_path / "lm"
    orchestrator.main([
        "train", "--target=mamba", "--config", str(REPO / "configs" / "mamba_train.yaml"), "--device", "cpu",
        f"data.train_file={sample_data_dir / 'lm_train.jsonl'}", f"data.val_file={sample_data_dir / 'lm_val.jsonl'}",
        f"paths.checkpoint_dir={lm / 'ckpt'}", f"paths.log_dir={lm / 'logs'}", f"model.pretrained={pretrained_hf_folder}",
        "model.adapter={r: 8, alpha: 16, target_modules: [in_proj]}", "model.max_length=64", "model.chunk_size=16",
        "training.batch_size=16", "training.max_steps=6", "training.learning_rate=0.01", "training.torch_threads=1",
    ])
    config = tiny_rlhf_config(lm / "ckpt", sample_data_dir, tmp_path, training={"method": "dpo"})
    config["model"]["adapter"] = ADAPTER
    config["training"]["sft"]["learning_rate"] = 0.01
    config["training"]["reward"]["init_from"] = "sft"
    return rlhf_pipeline.main(["--base-model", str(lm / "ckpt"), "--config", str(write_yaml(tmp_path / "rlhf.yaml", config)),
                               "--device", "cpu"])


def test_lora_from_a_pretrained_folder_through_mamba_sft_reward_and_dpo_then_peft_and_gguf(
    pretrained_hf_folder, sample_data_dir, tmp_path
):
    """The issue's chain: a transformers Mamba-2 folder, LoRA-tuned by --target=mamba, then SFT,
    the Mamba reward model and DPO each with an adapter (DPO's reference: its adapter disabled),
    then the policy leaves as a PEFT adapter (peft on Mamba2ForCausalLM: MARK's logits) and merged as GGUF
    (which llama.cpp runs in ``make test-gguf``); PPO with an adapter on the same stages resumes exactly."""
    from gguf import GGUFReader

    from src.pipelines.export import export_model

    summary = lora_chain(pretrained_hf_folder, sample_data_dir, tmp_path)
    out = tmp_path / "rlhf"
    metrics = summary["metrics"]
    assert metrics["sft"]["val_loss"] < metrics["sft"]["base_val_loss"]
    for name, kind in (("sft_model.pt", "mamba"), ("reward_model.pt", "rlhf_reward"), ("dpo_policy.pt", "mamba")):
        state = load_checkpoint(out / name, kind=kind)
        assert state["extra"]["adapter"]["modules"] == ["backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj"]
        assert {k.split(".lora_")[0] if ".lora_" in k else k for k in state["model"]} <= {
            "backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj", "lm.backbone.layers.0.mixer.in_proj",
            "lm.backbone.layers.1.mixer.in_proj", "head.weight", "head.bias", "score_mean", "score_std"}, name
    assert load_checkpoint(out / "dpo_policy.pt")["extra"]["adapter"]["base"]["checkpoint"] == str((out / "sft_model.pt").resolve())
    assert 0.0 <= metrics["evaluation"]["dpo_win_rate_vs_sft"] <= 1.0

    policy, tokenizer = load_rlhf_model(out)  # served unmerged: base (merged SFT) + the DPO adapter
    assert policy.has_adapter()
    assert isinstance(generate(policy, tokenizer, "How do I", max_new_tokens=6, temperature=0.0), str)
    peft = export_model("rlhf", "peft", tmp_path / "peft", out)
    assert peft["metrics"]["max_abs_diff"] <= 1e-4 and peft["outputs"]["base"] == str(tmp_path / "peft" / "base")
    gguf = export_model("rlhf", "gguf", tmp_path / "rlhf.gguf", out)["outputs"]["gguf"]
    assert len(GGUFReader(gguf).fields["tokenizer.ggml.tokens"].contents()) == 400

    # PPO with an adapter on the same SFT and reward model (policy and value head: no second model),
    # 4 iterations straight against 2, then --resume to 4: the same adapter weights.
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        for file in ("sft_model.pt", "reward_model.pt"):
            shutil.copy(out / file, tmp_path / name / file)
    common = ["--base-model", str(tmp_path / "lm" / "ckpt"), "--config", str(tmp_path / "rlhf.yaml"), "--device", "cpu",
              "--skip-sft", "--skip-reward", "--method", "ppo"]
    rlhf_pipeline.main([*common, "--output-dir", str(tmp_path / "straight"), "--num-rl-steps", "4"])
    rlhf_pipeline.main([*common, "--output-dir", str(tmp_path / "resumed"), "--num-rl-steps", "2"])
    rlhf_pipeline.main([*common, "--output-dir", str(tmp_path / "resumed"), "--num-rl-steps", "4", "--resume"])
    straight = load_checkpoint(tmp_path / "straight" / "ppo_policy.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "ppo_policy.pt")
    assert straight["extra"]["adapter"]["modules"] == ["backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj"]
    assert all(".lora_" in k for k in straight["model"]), sorted(straight["model"])
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert max((straight["model"][k] - resumed["model"][k]).abs().max().item() for k in straight["model"]) < 1e-6


def test_rlhf_starts_from_a_pretrained_folder_directly(pretrained_hf_folder, sample_data_dir, tmp_path):
    """--base-model FOLDER: SFT (full fine-tuning here) reads the transformers folder and its tokenizer."""
    config = tiny_rlhf_config(tmp_path / "unused.pt", sample_data_dir, tmp_path, training={"method": "dpo"})
    config["training"]["sft"]["max_train_examples"] = 16
    summary = rlhf_pipeline.main(["--base-model", str(pretrained_hf_folder), "--config",
                                  str(write_yaml(tmp_path / "rlhf.yaml", config)), "--device", "cpu", "--method", "dpo"])
    record = load_checkpoint(tmp_path / "rlhf" / "rlhf_final_model.pt", kind="rlhf")["provenance"]["base_model"]
    assert record["path"] == str(pretrained_hf_folder) and len(record["sha256"]) == 64
    policy, tokenizer = load_rlhf_model(tmp_path / "rlhf")
    assert not policy.has_adapter() and tokenizer.is_pretrained and policy.args.vocab_size == 400
    assert summary["metrics"]["sft"]["val_loss"] < summary["metrics"]["sft"]["base_val_loss"]
