"""How much of the demo's RL row is the seed: the demo RL stage over several seeds, on one or more indexes.

    python bench/rl_demo_seeds.py [--index fp32=/path/to/index bf16=checkpoints/rag] [--seeds 42 1 2 3 4 5]
        [--config configs/demo/rl_train.yaml] [--output bench/results/rl_demo_seeds.json]

Each (index, seed) runs the real stage (``src.training.orchestrator train --target=rl``, a subprocess, outputs in a
temporary folder) with ``system.seed`` and ``data.rag_index_dir`` overridden, and reads its ``eval_metrics.json``:
the trained policy's mean reward on the test split against the fixed strategy chosen on the val split, scored on the
same test queries (the targets table's RL row). The test split does not depend on the seed. Prints a table (one row per
index: the test reward per seed, the mean, how many seeds are above the baseline) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.core.runtime import machine_summary  # noqa: E402


def run_seed(config: Path, index: Path, seed: int, workdir: Path) -> dict:
    out = workdir / f"{index.name}-{seed}"
    command = [sys.executable, "-m", "src.training.orchestrator", "train", "--target=rl", f"--config={config}",
               f"system.seed={seed}", f"data.rag_index_dir={index}", f"paths.checkpoint_dir={out}/checkpoints",
               f"paths.log_dir={out}/logs"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}, index {index}: exit {done.returncode}\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "checkpoints" / "eval_metrics.json").read_text())
    test = metrics["test_split"]
    chosen = metrics["summary"]["best_fixed"]
    baseline = test["strategies"][f"fixed {chosen}"]["mean_reward"]
    return {"seed": seed, "test_reward": round(test["trained_mean_reward"], 4), "best_fixed_on_val": chosen,
            "best_fixed_test_reward": round(baseline, 4), "above": test["trained_mean_reward"] > baseline,
            "val_reward": round(metrics["summary"]["trained_mean_reward"], 4), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", nargs="+", default=["shipped=checkpoints/rag"], help="NAME=FOLDER of a built RAG index")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2, 3, 4, 5])
    parser.add_argument("--config", type=Path, default=Path("configs/demo/rl_train.yaml"))
    parser.add_argument("--output", type=Path, default=Path("bench/results/rl_demo_seeds.json"))
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.index:
            name, _, folder = spec.partition("=")
            index = Path(folder or name).resolve()
            results[name] = [run_seed(args.config, index, seed, Path(tmp)) for seed in args.seeds]
    print(f"{'index':<10}" + "".join(f"{'seed ' + str(s):>10}" for s in args.seeds) + f"{'mean':>9}{'above':>9}{'baseline':>10}")
    for name, rows in results.items():
        rewards = [r["test_reward"] for r in rows]
        above = sum(r["above"] for r in rows)
        print(f"{name:<10}" + "".join(f"{x:>10.4f}" for x in rewards) + f"{statistics.mean(rewards):>9.4f}"
              f"{f'{above}/{len(rows)}':>9}{rows[0]['best_fixed_test_reward']:>10.4f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"config": str(args.config), "seeds": args.seeds, "results": results,
                                       "machine": machine_summary()}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
