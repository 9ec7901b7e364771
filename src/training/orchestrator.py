"""MARK's one command line: ``python -m src.training.orchestrator train --target=<target>``.

Each target is a component entry point (``main(argv) -> summary``) called in-process;
the orchestrator only turns its own options into the entry point's arguments.
Also installed as the ``mark`` console command (``mark train --target=mamba``).
``export`` writes a trained model for transformers or llama.cpp (``mark export --model mamba
--format gguf --output exports/``). ``ingest`` adds files and folders to a RAG index
(``mark ingest docs/ --index checkpoints/rag --sync``; :func:`src.rag.ingest.ingest`).
``board`` serves the web UI (``mark board --port 7860``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from src.core.cli import run_cli
from src.core.errors import MarkError

# target -> (module with main(argv), what it trains)
TARGETS: dict[str, tuple[str, str]] = {
    "mamba": ("src.scripts.train_mamba", "Mamba long-document language model"),
    "transformer": ("src.scripts.train_transfer", "BERT-style 3-label document classifier"),
    "rag": ("src.scripts.train_rag_indexer", "FAISS index of sentence-transformers embeddings (+ --evaluate)"),
    "rl": ("src.scripts.train_rl", "PPO retrieval policy"),
    "rlhf": ("src.training.rlhf_pipeline", "SFT -> reward model -> PPO -> evaluation -> export on the Mamba model"),
    "full-pipeline": ("src.pipelines.full_pipeline", "every stage in order, then export"),
}

EPILOG = """targets:
{targets}

examples:
  python -m src.training.orchestrator train --target=mamba --device=cuda
  python -m src.training.orchestrator train --target=transformer --config=my_config.yaml
  python -m src.training.orchestrator train --target=rl --resume
  python -m src.training.orchestrator train --target=rag --evaluate
  python -m src.training.orchestrator train --target=mamba training.num_epochs=1 paths.checkpoint_dir=/tmp/m
  python -m src.training.orchestrator train --target=full-pipeline --device=cuda
  accelerate launch --num_processes 2 -m src.training.orchestrator train --target=mamba
  python -m src.training.orchestrator report
  python -m src.training.orchestrator ingest docs/ notes.md --index checkpoints/rag --sync
  python -m src.training.orchestrator export --model mamba --format hf --output exports/mamba-hf
  python -m src.training.orchestrator export --model rlhf --format gguf --dtype f16 --output exports/
  python -m src.training.orchestrator export --model transformer --format hf --output exports/classifier-hf --source pipeline_output/export
  python -m src.training.orchestrator board --port 7860 --data-root /data/docs

options a target knows beyond these (e.g. full-pipeline's --stages) are passed through to it.
"""


def build_parser() -> argparse.ArgumentParser:
    targets = "\n".join(f"  {name:<14} {desc}" for name, (_, desc) in TARGETS.items())
    parser = argparse.ArgumentParser(
        prog="mark",
        description="MARK training orchestrator: train, evaluate, report and export every component.",
        epilog=EPILOG.format(targets=targets),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,report,export,ingest,board}")
    train = sub.add_parser(
        "train",
        help="train a target",
        epilog=EPILOG.format(targets=targets),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--target", required=True, help=f"one of: {', '.join(TARGETS)}")
    train.add_argument("--config", help="path to a custom config file (default: the target's config in configs/)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device to use")
    train.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    train.add_argument("--evaluate", action="store_true", help="run evaluation (RAG)")
    report = sub.add_parser("report", help="plot logs/*/metrics.jsonl and write a summary report")
    report.add_argument("--logs-dir", default="logs")
    report.add_argument("--output-dir", default="reports")
    export = sub.add_parser(
        "export",
        help="write a trained model in an ecosystem format (HF safetensors folder, GGUF for llama.cpp)",
        description="Write a trained model for transformers (--format hf: a folder that from_pretrained loads) "
        "or llama.cpp (--format gguf: a mamba2 GGUF file; mamba and rlhf only).",
    )
    export.add_argument("--model", required=True, choices=["mamba", "rlhf", "transformer"])
    export.add_argument("--format", required=True, choices=["hf", "gguf", "peft"], help="peft: the LoRA adapter of a model trained with model.adapter")
    export.add_argument("--output", required=True, help="hf: the folder to write; gguf: the .gguf file, or a folder")
    export.add_argument("--source", help="checkpoint file or folder, or an export directory (default: the model's checkpoint folder)")
    export.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"], help="gguf: type of the big matrices (default f32)")
    ingest = sub.add_parser(
        "ingest",
        help="add files and folders to a RAG index (incremental: only new and changed documents are embedded)",
        description="Read files and folders recursively, chunk and embed new or changed documents, and commit them "
        "to the RAG index in batches (a killed run continues where it stopped when run again).",
    )
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files and folders to ingest")
    ingest.add_argument("--index", default="checkpoints/rag", help="the index folder (default: checkpoints/rag; created if needed)")
    ingest.add_argument("--include", action="append", metavar="GLOB", help="only files matching (relative path or name; repeatable)")
    ingest.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching (repeatable)")
    ingest.add_argument("--sync", action="store_true", help="also delete documents whose files are gone")
    ingest.add_argument("--strict", action="store_true", help="a file that cannot be read is an error (exit 2), not a skip")
    ingest.add_argument("--engine", choices=["local", "ray"], default="local", help="where to read, chunk and embed (default: local)")
    ingest.add_argument("--ray-address", help="join this Ray cluster (--engine ray; default: start a local one)")
    ingest.add_argument("--config", help="a RAG config (embedding model, chunking, index type, batch size; default: configs/rag_indexer.yaml)")
    ingest.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device of the embedding model")
    # Its own options (``mark board --help``) are parsed by src.board.app.
    sub.add_parser("board", help="web UI: train, watch runs, search, chat, rate answers, export (Gradio)", add_help=False)
    return parser


def run_ingest(args: argparse.Namespace) -> object:
    """``mark ingest``: the RAG config's model settings, then :func:`src.rag.ingest.ingest`; prints the summary."""
    from pathlib import Path

    from src.core.config import read_config_file, validate_config
    from src.rag.config import RagConfig
    from src.rag.ingest import ingest

    config_file = Path(args.config or "configs/rag_indexer.yaml")
    config = None
    if args.config or config_file.is_file():
        raw = read_config_file(config_file)
        raw.pop("data", None)  # the documents are the PATHs, not the config's data section
        if args.device:
            raw.setdefault("system", {})["device"] = args.device
        config = validate_config(raw, RagConfig, str(config_file))
    report = ingest(
        args.paths, args.index, include=args.include, exclude=args.exclude, sync=args.sync, strict=args.strict,
        engine=args.engine, ray_address=args.ray_address, config=config,
    )
    for path, reason in report.skipped_files:
        print(f"skipped {path}: {reason}")
    print(report.summary())
    return report


def target_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The entry point's arguments for the orchestrator's options."""
    argv: list[str] = []
    if args.config:
        argv += ["--config", args.config]
    if args.device:
        argv += ["--device", args.device]
    if args.resume:
        argv.append("--resume")
    if args.evaluate:
        argv.append("--evaluate")
    return argv + extra


def load_target(target: str):
    """The entry-point module of ``target``; an unknown or unbuilt target is a ``MarkError``."""
    if target not in TARGETS:
        raise MarkError(f"unknown target '{target}'; valid targets: {', '.join(TARGETS)}")
    module_name = TARGETS[target][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise MarkError(f"target '{target}' is not built yet ({module_name} does not exist)") from None
        raise


def main(argv: Sequence[str] | None = None) -> object:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "report":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        module = load_report_module()
        return module.main(["--logs-dir", args.logs_dir, "--output-dir", args.output_dir])
    if args.command == "export":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from src.pipelines.export import export_model

        return export_model(args.model, args.format, args.output, args.source, args.dtype)
    if args.command == "ingest":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return run_ingest(args)
    if args.command == "board":
        from src.board.app import main as board_main

        return board_main(extra)
    module = load_target(args.target)
    return module.main(target_argv(args, extra))


def load_report_module():
    try:
        return importlib.import_module("src.training.report")
    except ModuleNotFoundError as err:
        if err.name and "src.training.report".startswith(err.name):
            raise MarkError("the report command is not built yet (src.training.report does not exist)") from None
        raise


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
