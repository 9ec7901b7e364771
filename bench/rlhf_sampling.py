"""Where RLHF's sampling time goes, old code path vs new, in one run: DPO's sampled pairs.

    python bench/rlhf_sampling.py --sft-model checkpoints/rlhf/sft_model.pt [--prompts 64]
        [--samples 4] [--threads 1] [--output bench/results/rlhf_sampling.json]

On the first ``--prompts`` prompts of ``data/preferences_train.jsonl``, ``--samples`` answers
each (32 new tokens, temperature 1, as ``configs/demo/rlhf.yaml``'s DPO pairs), then the reward
model's scores of every answer:

* decoding: ``generate_ids`` with ``Decoder(model, "eager")`` (the old default) against the
  default decoder (the native kernel); the samples are compared (same seed: same tokens);
* scoring: MiniLM reward models of 6 and 3 layers (fresh heads: speed does not depend on the
  head), pairs in prompt order (the old ``score_texts``) against batches of similar length
  (the new one); the scores are compared.

Times are process CPU seconds (the box is shared: wall time measures the other jobs) and wall
seconds. Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data.readers import read_preferences  # noqa: E402
from src.mamba.load import load_mamba  # noqa: E402
from src.rlhf.data import PromptFormat, apply_template  # noqa: E402
from src.rlhf.reward_encoder import EncoderRewardModel, load_encoder, question_first  # noqa: E402

generation = importlib.import_module("src.mamba.generate")


def timed(work):
    wall, cpu = time.perf_counter(), time.process_time()
    out = work()
    return out, round(time.process_time() - cpu, 3), round(time.perf_counter() - wall, 3)


@torch.no_grad()
def score_in_prompt_order(model: EncoderRewardModel, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
    """The previous ``EncoderRewardModel.score_texts``: batches in the given order."""
    model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        texts = [question_first(apply_template(model.template, p)) for p in prompts[start : start + batch_size]]
        batch = model.encode(texts, responses[start : start + batch_size])
        scores.append(model(**batch))
    return torch.cat(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-model", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("bench/results/rlhf_sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm, tokenizer = load_mamba(args.sft_model)
    fmt = PromptFormat(tokenizer, "{prompt}\n", 384, 48)
    examples = read_preferences("data/preferences_train.jsonl")[: args.prompts]
    flat = [fmt.prompt_ids(e.prompt) for e in examples for _ in range(args.samples)]

    def sample(decoder_for) -> list[list[int]]:
        out = []
        for start in range(0, len(flat), 64):
            out += generation.generate_ids(lm, flat[start : start + 64], 32, 1.0, 1.0, seed=start, eos_id=tokenizer.eos_id,
                                           decoder=decoder_for(lm))
        return out

    results: dict = {"prompts": args.prompts, "samples": args.samples, "answers": len(flat), "threads": args.threads,
                     "machine": "2-core CPU box shared with other jobs (load average 10-20)"}
    eager, eager_cpu, eager_wall = timed(lambda: sample(lambda m: generation.Decoder(m, "eager")))
    native, native_cpu, native_wall = timed(lambda: sample(lambda m: None))
    results["decode"] = {"eager_cpu_s": eager_cpu, "eager_wall_s": eager_wall, "default_cpu_s": native_cpu,
                         "default_wall_s": native_wall, "default_backend": generation.default_decoder(lm).backend,
                         "same_samples": eager == native}

    prompts = [tokenizer.decode(p) for p in flat]
    responses = [tokenizer.decode(r) for r in native]
    results["score"] = {}
    for layers in (6, 3):
        encoder, encoder_tokenizer = load_encoder("minilm-local", layers=layers)
        torch.manual_seed(0)
        model = EncoderRewardModel(encoder, encoder_tokenizer, 128).eval()
        old, old_cpu, old_wall = timed(lambda: score_in_prompt_order(model, prompts, responses))
        new, new_cpu, new_wall = timed(lambda: model.score_texts(prompts, responses, templated=True))
        results["score"][f"{layers}_layers"] = {"prompt_order_cpu_s": old_cpu, "prompt_order_wall_s": old_wall,
                                                "by_length_cpu_s": new_cpu, "by_length_wall_s": new_wall,
                                                "max_score_difference": float((old - new).abs().max())}
    d, s6, s3 = results["decode"], results["score"]["6_layers"], results["score"]["3_layers"]
    print(f"{len(flat)} answers ({args.prompts} prompts x {args.samples}), {args.threads} thread(s), process CPU seconds:")
    print(f"  decode   eager {d['eager_cpu_s']:.2f}   default ({d['default_backend']}) {d['default_cpu_s']:.2f}   "
          f"{d['eager_cpu_s'] / d['default_cpu_s']:.2f}x   same samples: {d['same_samples']}")
    for name, row in (("6 layers", s6), ("3 layers", s3)):
        print(f"  score, MiniLM {name}: prompt order {row['prompt_order_cpu_s']:.2f}   by length {row['by_length_cpu_s']:.2f}   "
              f"{row['prompt_order_cpu_s'] / row['by_length_cpu_s']:.2f}x   max |diff| {row['max_score_difference']:.1e}")
    old_total = d["eager_cpu_s"] + s6["prompt_order_cpu_s"]
    new_total = d["default_cpu_s"] + s3["by_length_cpu_s"]
    results["old_total_cpu_s"], results["new_total_cpu_s"] = old_total, new_total
    print(f"  sample + score: old (eager, 6 layers, prompt order) {old_total:.2f}   new (native, 3 layers, by length) "
          f"{new_total:.2f}   {old_total / new_total:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
