"""The shared training engine, run for real on a small character-level language model
(tests/training/char_lm_script.py) in subprocesses, as a user would run a component."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.core.checkpoint import load_checkpoint
from src.training.engine import ResumableBatchSampler, lr_lambda

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "tests" / "training" / "char_lm_script.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _config(tmp_path, name, **training):
    train = {"batch_size": 8, "num_epochs": 2, "learning_rate": 0.003, "log_steps": 5,
             "warmup_steps": 3, "gradient_accumulation_steps": 2, **training}
    lines = ["training:"] + [f"  {k}: {v}" for k, v in train.items()]
    lines += ["paths:", f"  checkpoint_dir: {tmp_path / name / 'ckpt'}", f"  log_dir: {tmp_path / name / 'logs'}",
              "system:", "  device: cpu", "  seed: 7"]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(args, **kw):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=ENV, cwd=REPO, **kw)


def _final_weights(tmp_path, name, epochs=2):
    return load_checkpoint(tmp_path / name / "ckpt" / f"checkpoint_epoch_{epochs}.pt")["model"]


def _kill_at_step(proc: subprocess.Popen, pointer: Path, step: int, timeout: float = 120) -> int | None:
    """SIGKILL ``proc`` once its ``latest.json`` names a checkpoint at ``step`` or later; returns
    that step (None when the run ended first or the timeout passed). Waits for the process."""
    killed_at, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists():
            info = json.loads(pointer.read_text())
            if info["step"] >= step:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = info["step"]
                break
        time.sleep(0.002)
    proc.wait()
    return killed_at


ADAPTER = "model.adapter={r: 4, alpha: 8, dropout: 0.1, target_modules: [head]}"


@pytest.mark.parametrize("adapter", [[], [ADAPTER]], ids=["full", "lora"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, adapter):
    # With a LoRA adapter (src/training/adapters.py) the checkpoints hold only the adapter and the
    # resumed run must still end with the uninterrupted run's adapter weights.
    common = ["data.max_chars=40000", "training.save_steps=4", "training.eval_steps=25", *adapter]
    ref_cfg = _config(tmp_path, "ref")
    assert _run(["--config", str(ref_cfg), *common]).returncode == 0
    steps_total = load_checkpoint(tmp_path / "ref" / "ckpt" / "checkpoint_epoch_2.pt")["progress"]["step"]

    cfg = _config(tmp_path, "killed")
    pointer = tmp_path / "killed" / "ckpt" / "latest.json"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(cfg), *common], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = _kill_at_step(proc, pointer, 12)  # past the first epoch's start, well before the end
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed_at < steps_total // 2, "kill should land mid first epoch"
    assert not (tmp_path / "killed" / "ckpt" / "checkpoint_epoch_2.pt").exists()

    resumed = _run(["--config", str(cfg), "--resume", *common])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr

    ref, res = _final_weights(tmp_path, "ref"), _final_weights(tmp_path, "killed")
    if adapter:
        assert sorted(ref) == ["head.lora_A.default.weight", "head.lora_B.default.weight"]  # only what trains
    diff = max((ref[k] - res[k]).abs().max().item() for k in ref)
    assert diff <= 1e-6, f"max abs weight difference {diff}"
    ref_final = load_checkpoint(tmp_path / "ref" / "ckpt" / "checkpoint_epoch_2.pt")
    res_final = load_checkpoint(tmp_path / "killed" / "ckpt" / "checkpoint_epoch_2.pt")
    assert ref_final["progress"] == res_final["progress"]


def test_gradient_accumulation_equals_bigger_batch(tmp_path):
    a = _run(["--config", str(_config(tmp_path, "acc", batch_size=4, gradient_accumulation_steps=2)), "model.dropout=0.0",
              "training.num_epochs=1"])
    b = _run(["--config", str(_config(tmp_path, "big", batch_size=8, gradient_accumulation_steps=1)), "model.dropout=0.0",
              "training.num_epochs=1"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-1000:] + b.stderr[-1000:]
    wa, wb = _final_weights(tmp_path, "acc", 1), _final_weights(tmp_path, "big", 1)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_two_process_ddp_reaches_the_same_loss_as_one_process(tmp_path):
    """`accelerate launch --num_processes 2` (DDP over gloo on CPU), batch 4 per process,
    against one process with batch 8: the same global batches, so the same loss."""
    single_cfg = _config(tmp_path, "single", batch_size=8, gradient_accumulation_steps=1)
    ddp_cfg = _config(tmp_path, "ddp", batch_size=4, gradient_accumulation_steps=1)
    one = _run(["--config", str(single_cfg), "model.dropout=0.0"])
    assert one.returncode == 0, one.stderr[-1000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              SCRIPT, "--config", str(ddp_cfg), "model.dropout=0.0"]
    two = subprocess.run(launch, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 process(es)" in (tmp_path / "ddp" / "logs" / "train.log").read_text()

    def final_eval(name):
        rows = [json.loads(x) for x in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if r["kind"] == "eval"]
        return evals[-1]["val_loss"], evals[-1]["step"]

    (loss1, step1), (loss2, step2) = final_eval("single"), final_eval("ddp")
    assert step1 == step2
    assert abs(loss1 - loss2) < 1e-4, (loss1, loss2)


def test_outputs_and_metrics_log(tmp_path):
    cfg = _config(tmp_path, "out", eval_steps=10, save_steps=5, save_total_limit=2)
    proc = _run(["--config", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-1000:]
    ckpt = tmp_path / "out" / "ckpt"
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"best_model.pt", "checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "config.yaml", "latest.json"} <= set(names)
    assert len([n for n in names if n.startswith("checkpoint_step_")]) <= 2
    best = load_checkpoint(ckpt / "best_model.pt", kind="charlm")
    rows = [json.loads(x) for x in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert best["metrics"]["val_loss"] == pytest.approx(min(r["val_loss"] for r in evals), abs=1e-6)
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert all(r["lr"] >= 0 and "tokens_per_s" in r for r in train)
    log = (tmp_path / "out" / "logs" / "train.log").read_text()
    assert "eval at step" in log and "new best val_loss" in log


def test_sampler_order_depends_on_seed_and_epoch_only_and_shards_global_batches():
    one = list(ResumableBatchSampler(20, 4, seed=1, epoch=0))
    again = list(ResumableBatchSampler(20, 4, seed=1, epoch=0))
    other_epoch = list(ResumableBatchSampler(20, 4, seed=1, epoch=1))
    assert one == again and one != other_epoch
    assert sorted(i for b in one for i in b) == list(range(20))
    assert list(ResumableBatchSampler(20, 4, seed=1, epoch=0, start_batch=2)) == one[2:]
    r0 = list(ResumableBatchSampler(20, 2, seed=1, epoch=0, rank=0, world_size=2))
    r1 = list(ResumableBatchSampler(20, 2, seed=1, epoch=0, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == one


def test_lr_schedule_warmup_then_decay():
    f = lr_lambda("cosine", warmup_steps=4, total_steps=14)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)


def test_same_seed_twice_gives_identical_metrics_and_weights(tmp_path):
    """Two runs with the same seed and config (dropout on: the random stream matters), in
    fresh interpreters with different hash seeds: every logged number and every weight equal."""
    runs = {}
    for name, hash_seed in (("first", "1"), ("second", "2")):
        cfg = _config(tmp_path, name, num_epochs=1, eval_steps=4)
        proc = subprocess.run([sys.executable, SCRIPT, "--config", str(cfg), "data.max_chars=3000"], capture_output=True,
                              text=True, env={**ENV, "PYTHONHASHSEED": hash_seed}, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-1000:]
        rows = [json.loads(x) for x in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        timing = {"time", "tokens_per_s"}
        runs[name] = ([{k: v for k, v in r.items() if k not in timing} for r in rows], _final_weights(tmp_path, name, 1))
    (rows1, w1), (rows2, w2) = runs["first"], runs["second"]
    assert len(rows1) >= 3 and any(r["kind"] == "eval" for r in rows1)
    assert rows1 == rows2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def _evals(tmp_path, name):
    rows = [json.loads(x) for x in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]


def _expected_stop(evals, patience, min_delta):
    """The step at which early stopping should end training, replayed from the logged validations."""
    best, waited = None, 0
    for step, loss in evals:
        waited = 0 if best is None or best - loss > min_delta else waited + 1
        best = loss if best is None or loss < best else best
        if waited >= patience:
            return step
    return None


# Small corpus, no dropout, constant high LR: the char model overfits within ~100 steps.
EARLY = ["data.max_chars=3000", "model.dropout=0.0"]


def _early_config(tmp_path, name, **training):
    return _config(tmp_path, name, num_epochs=30, learning_rate=0.01, lr_scheduler="constant", warmup_steps=0,
                   gradient_accumulation_steps=1, eval_steps=5, early_stopping_patience=3, **training)


@pytest.mark.parametrize("min_delta", [0.0, 0.02])
def test_early_stopping_stops_and_restores_the_best_weights(tmp_path, min_delta):
    cfg = _early_config(tmp_path, "es", early_stopping_min_delta=min_delta)
    final = tmp_path / "final.pt"
    proc = _run(["--config", str(cfg), *EARLY, "--final-weights", str(final)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = _evals(tmp_path, "es")
    out = torch.load(final)
    assert out["stopped_early"] and out["step"] < 30 * 11  # 83 windows / batch 8: 11 steps per epoch
    assert out["step"] == evals[-1][0] == _expected_stop(evals, 3, min_delta)
    best_step, best_loss = min(evals, key=lambda e: e[1])
    best = load_checkpoint(tmp_path / "es" / "ckpt" / "best_model.pt", kind="charlm")
    assert best["step"] == best_step and best["metrics"]["val_loss"] == pytest.approx(best_loss, abs=1e-6)
    if min_delta == 0:  # (with a min_delta, improvements too small to count can still make the last the best)
        assert evals[-1][1] > best_loss + 0.005  # the last weights are worse
    assert out["metrics"]["val_loss"] == pytest.approx(best_loss, abs=1e-6)  # fit() returns the best's
    assert all(torch.equal(out["model"][k], best["model"][k]) for k in best["model"])
    assert "early stopping at step" in (tmp_path / "es" / "logs" / "train.log").read_text()


def test_early_stopping_resumes_after_sigkill_with_its_patience_counter(tmp_path):
    ref = _run(["--config", str(_early_config(tmp_path, "ref")), *EARLY])
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_evals = _evals(tmp_path, "ref")
    stop_step = ref_evals[-1][0]
    best_step = min(ref_evals, key=lambda e: e[1])[0]
    first_miss = next(s for s, _ in ref_evals if s > best_step)  # the counter is 1 from here on

    cfg = _early_config(tmp_path, "killed", save_steps=5)
    pointer = tmp_path / "killed" / "ckpt" / "latest.json"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(cfg), *EARLY], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = _kill_at_step(proc, pointer, first_miss)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert killed_at < stop_step
    at_kill = load_checkpoint(pointer.parent / json.loads(pointer.read_text())["path"])["progress"]
    assert at_kill["evals_without_improvement"] >= 1 and not at_kill["stopped_early"]

    final = tmp_path / "final.pt"
    resumed = _run(["--config", str(cfg), "--resume", *EARLY, "--final-weights", str(final)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    out = torch.load(final)
    assert out["stopped_early"] and out["step"] == stop_step
    ref_best = load_checkpoint(tmp_path / "ref" / "ckpt" / "best_model.pt")
    res_best = load_checkpoint(tmp_path / "killed" / "ckpt" / "best_model.pt")
    assert res_best["step"] == ref_best["step"] == best_step
    assert max((ref_best["model"][k] - out["model"][k]).abs().max().item() for k in out["model"]) <= 1e-6

    evals = _evals(tmp_path, "killed")
    assert evals[-1][0] == stop_step
    again = _run(["--config", str(cfg), "--resume", *EARLY])  # a stopped run stays stopped
    assert again.returncode == 0, again.stderr[-2000:]
    assert _evals(tmp_path, "killed") == evals
