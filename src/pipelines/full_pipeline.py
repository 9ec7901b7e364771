"""MARK end to end: data, every model, export, report, in one command.

    python -m src.pipelines.full_pipeline [--device cpu|cuda|auto] [--skip-data-prep]
        [--stages data_prep train_mamba train_transformer build_rag train_rl train_rlhf export_models]
        [--output-dir pipeline_output] [--config-dir configs] [--data-dir data]
        [--export-dir DIR] [--force] [--resume]

Stages, in this order (``--stages`` picks some; the order stays):

1. ``data_prep``          write the sample corpus into ``--data-dir`` if it is not there, validate every data file
2. ``train_mamba``        ``src.scripts.train_mamba``          with ``<config-dir>/mamba_train.yaml``
3. ``train_transformer``  ``src.scripts.train_transfer``       with ``<config-dir>/transfer_train.yaml``
4. ``build_rag``          ``src.scripts.train_rag_indexer``    with ``<config-dir>/rag_indexer.yaml`` (+ evaluation)
5. ``train_rl``           ``src.scripts.train_rl``             with ``<config-dir>/rl_train.yaml`` (reads the RAG index)
6. ``train_rlhf``         ``src.training.rlhf_pipeline``       with ``<config-dir>/rlhf.yaml`` (starts from the Mamba model)
7. ``export_models``      copy every trained model to ``--export-dir`` (default ``<output-dir>/export``),
                          load each copy back, write its manifest

A config missing from ``--config-dir`` is taken from ``configs/``. Each stage runs in this
process through its component's ``run(cfg, resume, evaluate)``, as ``mark train`` runs it.
A stage whose outputs are current for its config and inputs is skipped (see
:mod:`src.pipelines.state`) unless ``--force``. A failing stage stops the pipeline with one
line naming the stage and the log holding the traceback. At the end: a summary table
(stage, status, wall and CPU time, key metric, output), the targets table (every model's metric
against its cheap baseline on the same split, ✓ / ✗: :mod:`src.pipelines.targets`),
``<output-dir>/pipeline_manifest.json`` and a report with curves and evaluation tables (``<output-dir>/report/report.md``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from src.core.checkpoint import atomic_write_json
from src.core.cli import run_cli
from src.core.config import StrictModel, config_hash
from src.core.errors import ConfigError, MarkError
from src.core.logging import LOG_FORMAT, DATE_FORMAT, get_logger, setup_logging
from src.pipelines.stages import (
    DATA_PREP,
    EXPORT_MODELS,
    STAGE_ORDER,
    TRAIN_STAGES,
    TrainStage,
    format_key_metric,
    load_stage_config,
)
from src.pipelines.state import STATE_FILE, PipelineState, fingerprint, json_safe, why_not_current
from src.pipelines.targets import check_targets, checks_as_dicts, format_targets

MANIFEST_FILE = "pipeline_manifest.json"
PIPELINE_LOG = "pipeline.log"
REPORT_DIR = "report"
SERVER_COMMAND = "python -m src.api.main"

log = get_logger("pipeline")


class StageFailedError(MarkError):
    """A stage raised: the message names the stage, the reason and the log to read."""

    def __init__(self, stage: str, reason: str, log_path: Path, exit_code: int) -> None:
        super().__init__(f"stage {stage} failed: {reason} (traceback and log: {log_path})")
        self.stage = stage
        self.log_path = log_path
        self.exit_code = exit_code


@dataclass
class PipelineOptions:
    """The command line, as values (``run_pipeline`` takes these)."""

    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    device: str | None = None
    output_dir: Path = Path("pipeline_output")
    config_dir: Path = Path("configs")
    data_dir: Path = Path("data")
    export_dir: Path | None = None
    force: bool = False
    resume: bool = False
    report: bool = True


@dataclass
class StageResult:
    """One row of the summary table."""

    stage: str
    status: str  # ran | skipped | failed | interrupted
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    key_metric: str = ""
    note: str = ""
    config: str | None = None
    config_hash: str | None = None
    log: str | None = None
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): a busy machine inflates wall time, not this
    load_average: float | None = None  # 1-minute load average when the stage ended

    def main_output(self) -> str:
        for key in ("checkpoint_dir", "export_dir", "data_dir", "final_model", "best_model", "faiss_index", "rlhf_final_model"):
            if self.outputs.get(key):
                path = Path(str(self.outputs[key]))
                return str(path.parent if key in ("final_model", "best_model", "faiss_index", "rlhf_final_model") else path)
        return ""


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.pipelines.full_pipeline",
        description="Run MARK end to end: data preparation, every model, export and report.",
        epilog="stages: " + " ".join(STAGE_ORDER),
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="system.device of every stage (default: each config's)")
    parser.add_argument("--stages", nargs="+", choices=STAGE_ORDER, metavar="STAGE", help="run only these stages (in pipeline order)")
    parser.add_argument("--skip-data-prep", action="store_true", help="leave out the data_prep stage")
    parser.add_argument("--output-dir", type=Path, default=Path("pipeline_output"), help="manifest, state, log, report and export (default: pipeline_output)")
    parser.add_argument("--config-dir", "--config", dest="config_dir", type=Path, default=Path("configs"),
                        help="folder of the stage configs; a file missing there is taken from configs/ (default: configs)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where data_prep writes and validates the sample data (default: data)")
    parser.add_argument("--export-dir", type=Path, default=None, help="exported models (default: <output-dir>/export)")
    parser.add_argument("--force", action="store_true", help="rerun every selected stage even if its outputs are current")
    parser.add_argument("--resume", action="store_true", help="stages that run continue from their latest checkpoint")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    # The orchestrator forwards its --evaluate; the pipeline always evaluates.
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    return parser


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    if args.config_dir.is_file():
        raise ConfigError(f"{args.config_dir}: the full pipeline reads a folder of configs (--config-dir), not one file")
    stages = [s for s in STAGE_ORDER if s in (args.stages or STAGE_ORDER)]
    if args.skip_data_prep:
        stages = [s for s in stages if s != DATA_PREP]
    if not stages:
        raise ConfigError("--stages / --skip-data-prep: no stage left to run")
    return PipelineOptions(
        stages=stages, device=args.device, output_dir=args.output_dir, config_dir=args.config_dir,
        data_dir=args.data_dir, export_dir=args.export_dir, force=args.force, resume=args.resume,
        report=not args.no_report,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line and run the pipeline; returns :func:`run_pipeline`'s summary."""
    args = build_parser().parse_args(argv)
    return run_pipeline(options_from_args(args), argv=list(sys.argv[1:] if argv is None else argv))


# ---------------------------------------------------------------- the pipeline


def run_pipeline(opts: PipelineOptions, argv: list[str] | None = None) -> dict:
    """Run ``opts.stages`` in order; returns ``{"metrics": {stage: metrics}, "outputs": {...},
    "stages": [rows of the summary table]}``. A failing stage raises :class:`StageFailedError`
    after the manifest and the summary table are written."""
    if opts.device:
        from src.core.runtime import resolve_device

        resolve_device(opts.device)  # --device cuda without a GPU fails now, not after the data stage
    output_dir = Path(opts.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    export_dir = Path(opts.export_dir) if opts.export_dir else output_dir / "export"
    pipeline_log = output_dir / PIPELINE_LOG
    _console_logging(pipeline_log)
    state = PipelineState(output_dir / STATE_FILE)
    manifest = _new_manifest(opts, argv, export_dir)
    manifest_path = output_dir / MANIFEST_FILE
    configs: dict[str, Any] = {}  # stage -> loaded config, for export and report
    results: list[StageResult] = []
    started = time.perf_counter()
    log.info("pipeline: %s (configs: %s, outputs: %s)", " -> ".join(opts.stages), opts.config_dir, output_dir)

    for name in opts.stages:
        log.info("stage %s ...", name)
        stage_started, cpu_started = time.perf_counter(), time.process_time()
        result = StageResult(name, "failed")
        try:
            if name == DATA_PREP:
                result = run_data_prep(opts)
            elif name == EXPORT_MODELS:
                result = run_export(opts, state, configs, export_dir)
            else:
                result = run_train_stage(TRAIN_STAGES[name], opts, state, configs)
        except BaseException as err:
            result.seconds = time.perf_counter() - stage_started
            _stamp_resources(result, cpu_started)
            interrupted = isinstance(err, KeyboardInterrupt)
            result.status = "interrupted" if interrupted else "failed"
            log_path = _stage_log_path(name, configs.get(name), pipeline_log)
            result.log = str(log_path)
            _record_failure(name, err, log_path, pipeline_log)
            state.forget(name)
            results.append(result)
            _finish_manifest(manifest, manifest_path, results, started, "interrupted" if interrupted else "failed")
            print(format_summary(results), file=sys.stderr)
            if interrupted:
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            if not isinstance(err, MarkError):
                reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
            raise StageFailedError(name, reason[:300], log_path, err.exit_code if isinstance(err, MarkError) else 1) from err
        finally:
            _console_logging(pipeline_log)  # a component replaced the log handlers with its own
        _stamp_resources(result, cpu_started)
        results.append(result)
        log.info("stage %s %s in %.1fs%s", name, result.status, result.seconds, f": {result.key_metric}" if result.key_metric else "")
        _finish_manifest(manifest, manifest_path, results, started, "running")

    report_path = None
    if opts.report:
        report_path = write_pipeline_report(configs, output_dir / REPORT_DIR)
    manifest["report"] = str(report_path) if report_path else None
    checks = check_targets({r.stage: r.metrics for r in results})
    manifest["targets"] = checks_as_dicts(checks)
    _finish_manifest(manifest, manifest_path, results, started, "completed")
    total = time.perf_counter() - started
    print(format_summary(results))
    if checks:
        print(format_targets(checks))
    print(format_next_steps(output_dir, manifest_path, report_path, export_dir if EXPORT_MODELS in opts.stages else None,
                            configs, total))
    return {
        "metrics": {r.stage: r.metrics for r in results},
        "outputs": {"manifest": str(manifest_path), "state": str(state.path), "report": str(report_path) if report_path else None,
                    "export_dir": str(export_dir) if EXPORT_MODELS in opts.stages else None},
        "stages": [_row(r) for r in results],
        "targets": checks_as_dicts(checks),
        "seconds": round(total, 1),
    }


def run_data_prep(opts: PipelineOptions) -> StageResult:
    """Write the sample corpus into ``opts.data_dir`` when it is not there (or ``--force``),
    then validate every data file. Files a user put there (no ``manifest.json``) are
    validated, never overwritten."""
    from src.data.prepare import DATA_FILES, MANIFEST_FILE as DATA_MANIFEST, prepare_sample_data, validate_data_files

    started = time.perf_counter()
    data_dir = Path(opts.data_dir)
    manifest = data_dir / DATA_MANIFEST
    before = manifest.read_bytes() if manifest.is_file() else None
    all_there = all((data_dir / name).is_file() for name in DATA_FILES.values())
    user_data = before is None and all_there
    if not user_data:
        prepare_sample_data(data_dir, force=opts.force)
    counts = validate_data_files(data_dir)
    created = not user_data and (before is None or manifest.read_bytes() != before or opts.force)
    metrics = {"documents": counts.get("documents.jsonl", 0), "files": len(counts), "records": sum(counts.values())}
    note = "sample data written" if created else ("your data, validated" if user_data else "sample data up to date, validated")
    outputs = {"data_dir": str(data_dir)}
    if manifest.is_file():
        outputs["manifest"] = str(manifest)
    return StageResult(
        DATA_PREP, "ran" if created else "skipped", time.perf_counter() - started, metrics, outputs,
        key_metric=f"{metrics['files']} files, {metrics['documents']} documents", note=note,
    )


def run_train_stage(stage: TrainStage, opts: PipelineOptions, state: PipelineState, configs: dict[str, Any]) -> StageResult:
    """Load the stage's config, skip it when current, else run its component."""
    started = time.perf_counter()
    cfg, config_path = load_stage_config(stage, opts.config_dir, opts.device)
    configs[stage.name] = cfg
    _warn_about_wiring(stage, cfg, configs)
    expected = fingerprint(cfg)
    reason = why_not_current(state.get(stage.name), expected)
    base = dict(config=str(config_path), config_hash=expected["config_hash"], log=str(Path(cfg.paths.log_dir) / "train.log"))
    if reason is None and not opts.force:
        entry = state.get(stage.name)
        metrics = entry.get("metrics") or {}
        outputs = {k: v["path"] for k, v in (entry.get("outputs") or {}).items()}
        outputs.setdefault("checkpoint_dir", str(cfg.paths.checkpoint_dir))
        return StageResult(stage.name, "skipped", time.perf_counter() - started, metrics, outputs,
                           format_key_metric(stage, metrics), note="current", **base)
    log.info("%s: running (%s) with %s", stage.name, "--force" if opts.force and reason is None else reason, config_path)
    summary = stage.run(cfg, resume=opts.resume)
    metrics, outputs = dict(summary.get("metrics") or {}), dict(summary.get("outputs") or {})
    outputs.setdefault("checkpoint_dir", str(cfg.paths.checkpoint_dir))
    seconds = time.perf_counter() - started
    state.record(stage.name, expected, outputs, metrics, seconds, str(config_path))
    return StageResult(stage.name, "ran", seconds, metrics, outputs, format_key_metric(stage, metrics), **base)


def run_export(opts: PipelineOptions, state: PipelineState, configs: dict[str, Any], export_dir: Path) -> StageResult:
    """Export every trained model (skipped when the export is current for the same files)."""
    from src.pipelines.export import export_inputs, export_models

    started = time.perf_counter()
    sources = model_sources(opts, state, configs)
    inputs = export_inputs(sources)
    settings = _ExportSettings(export_dir=str(export_dir), models=sorted(sources))
    expected = fingerprint(settings, inputs)
    reason = why_not_current(state.get(EXPORT_MODELS), expected)
    if reason is None and not opts.force:
        entry = state.get(EXPORT_MODELS)
        metrics = entry.get("metrics") or {}
        return StageResult(EXPORT_MODELS, "skipped", time.perf_counter() - started, metrics, {"export_dir": str(export_dir)},
                           _export_key_metric(metrics), note="current")
    summary = export_models(sources, export_dir)
    metrics = dict(summary["metrics"])
    metrics["models"] = sorted(summary["manifest"]["models"])
    outputs = {"export_dir": str(export_dir), **summary["outputs"]}
    seconds = time.perf_counter() - started
    state.record(EXPORT_MODELS, expected, outputs, metrics, seconds)
    return StageResult(EXPORT_MODELS, "ran", seconds, metrics, outputs, _export_key_metric(metrics))


def model_sources(opts: PipelineOptions, state: PipelineState, configs: dict[str, Any]):
    """The checkpoint folder of every model, from its stage's config (loaded now if the
    stage did not run in this pipeline), with what the state file knows about it."""
    from src.core.load_model import model_spec
    from src.pipelines.export import ModelSource

    sources = {}
    for stage in TRAIN_STAGES.values():
        cfg = configs.get(stage.name)
        if cfg is None:
            try:
                cfg, _ = load_stage_config(stage, opts.config_dir, opts.device)
            except Exception as err:  # no config, its data gone, component not built: try the standard folder
                default_dir = Path(model_spec(stage.model).default_dir)
                log.info("export: cannot read the %s config (%s); looking for the model in %s",
                         stage.model, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, default_dir)
                sources[stage.model] = ModelSource(stage.model, default_dir, stage=stage.name)
                continue
            configs[stage.name] = cfg
        entry = state.get(stage.name) or {}
        sources[stage.model] = ModelSource(
            name=stage.model,
            checkpoint_dir=Path(cfg.paths.checkpoint_dir),
            log_dir=Path(cfg.paths.log_dir),
            stage=stage.name,
            # the hash of the config it was trained with, when this pipeline trained it
            config_hash=(entry.get("fingerprint") or {}).get("config_hash") or config_hash(cfg),
            config_path=entry.get("config"),
            metrics=entry.get("metrics") or {},
            required=stage.name in opts.stages,
        )
    return sources


def write_pipeline_report(configs: dict[str, Any], report_dir: Path) -> Path | None:
    """The report (curves + evaluation tables) of every stage whose config was read."""
    from src.training.report import ComponentLogs, build_report

    components = [
        ComponentLogs(name=stage.model, log_dir=Path(configs[name].paths.log_dir), eval_dirs=[Path(configs[name].paths.checkpoint_dir)])
        for name, stage in TRAIN_STAGES.items()
        if name in configs
    ]
    if not components:
        return None
    try:
        return build_report(components, report_dir)
    except Exception as err:  # the models are trained and exported: a plotting problem must not fail the run
        log.warning("could not write the report to %s: %s", report_dir, err)
        return None


# ---------------------------------------------------------------- summary, manifest, logs


def format_summary(results: Sequence[StageResult]) -> str:
    """The summary table: stage, status, wall time, CPU time, key metric, output."""
    rows = [("stage", "status", "time", "cpu", "key metric", "output")]
    for r in results:
        status = r.status + (f" ({r.note})" if r.note and r.status != "ran" else "")
        output = r.log if r.status in ("failed", "interrupted") else r.main_output()
        rows.append((r.stage, status, _duration(r.seconds), _duration(r.cpu_seconds), r.key_metric, output or ""))
    rows.append(("total", "", _duration(sum(r.seconds for r in results)), _duration(sum(r.cpu_seconds for r in results)), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append(rule)
    return "\n" + "\n".join(lines) + "\n"


def format_next_steps(output_dir: Path, manifest_path: Path, report_path: Path | None, export_dir: Path | None,
                      configs: dict[str, Any], seconds: float) -> str:
    lines = [f"Pipeline finished in {_duration(seconds)}. Results:"]
    lines.append(f"  manifest (every stage, metrics, outputs): {manifest_path}")
    if report_path:
        lines.append(f"  report (loss / metric curves, evaluation tables): {report_path}")
    if export_dir:
        lines.append(f"  exported models (+ manifest.json): {export_dir}")
    checkpoint_dirs = sorted({str(cfg.paths.checkpoint_dir) for cfg in configs.values()})
    log_dirs = sorted({str(cfg.paths.log_dir) for cfg in configs.values()})
    if checkpoint_dirs:
        lines.append(f"  checkpoints: {' '.join(checkpoint_dirs)}")
        lines.append(f"  logs: {' '.join(log_dirs)}")
    lines.append(f"Start the API server: {SERVER_COMMAND}")
    lines.append("Load a model in Python: from src.core import load_model; model, tokenizer, device = load_model(\"mamba\")")
    return "\n".join(lines)


def _export_key_metric(metrics: dict[str, Any]) -> str:
    models = metrics.get("models") or []
    return f"{len(models)} models load: {' '.join(models)}" if models else ""


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"


def _row(result: StageResult) -> dict[str, Any]:
    return {
        "stage": result.stage, "status": result.status, "note": result.note, "seconds": round(result.seconds, 2),
        "cpu_seconds": round(result.cpu_seconds, 2), "load_average_at_end": result.load_average,
        "key_metric": result.key_metric, "metrics": result.metrics, "outputs": result.outputs,
        "config": result.config, "config_hash": result.config_hash, "log": result.log,
    }


def _stamp_resources(result: StageResult, cpu_started: float) -> None:
    result.cpu_seconds = time.process_time() - cpu_started
    load = _load_average()
    result.load_average = load[0] if load else None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _new_manifest(opts: PipelineOptions, argv: list[str] | None, export_dir: Path) -> dict[str, Any]:
    from src.pipelines.export import package_versions

    return {
        "format": "mark-pipeline-manifest",
        "version": 1,
        "status": "running",
        "command": ["python", "-m", "src.pipelines.full_pipeline", *(argv or [])],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages_selected": opts.stages,
        "config_dir": str(opts.config_dir),
        "data_dir": str(opts.data_dir),
        "export_dir": str(export_dir),
        "device": opts.device,
        "force": opts.force,
        "resume": opts.resume,
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_start": _load_average(),
        },
        "packages": package_versions(),
    }


def _finish_manifest(manifest: dict, path: Path, results: Sequence[StageResult], started: float, status: str) -> None:
    manifest["status"] = status
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    manifest["machine"]["load_average_now"] = _load_average()
    manifest["stages"] = [_row(r) for r in results]
    atomic_write_json(path, json_safe(manifest))


def _console_logging(pipeline_log: Path) -> None:
    """Console logging, plus every pipeline message in ``pipeline.log``.

    Components call ``setup_logging`` for their own ``train.log``, which replaces the handlers
    of MARK's root logger; the pipeline's file handler sits on its own logger and survives."""
    import logging

    setup_logging("pipeline")
    pipeline_logger = logging.getLogger("mark.pipeline")
    target = str(pipeline_log.resolve())
    if not any(getattr(h, "baseFilename", None) == target for h in pipeline_logger.handlers):
        for handler in list(pipeline_logger.handlers):
            pipeline_logger.removeHandler(handler)
            handler.close()
        pipeline_log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(pipeline_log)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        pipeline_logger.addHandler(handler)


def _stage_log_path(stage: str, cfg: Any, pipeline_log: Path) -> Path:
    """The log a user should read when ``stage`` fails: its component's ``train.log`` when
    its config was read, else the pipeline's log."""
    if cfg is not None and getattr(getattr(cfg, "paths", None), "log_dir", None) is not None:
        return Path(cfg.paths.log_dir) / "train.log"
    return pipeline_log


def _record_failure(stage: str, err: BaseException, log_path: Path, pipeline_log: Path) -> None:
    """Append the traceback to the stage's log and the pipeline's log (not the console:
    there, one line says what failed and where to read more)."""
    setup_logging("pipeline")  # closes the component's handlers before we append to its file
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    stamp = time.strftime(DATE_FORMAT)
    for path in dict.fromkeys([log_path, pipeline_log]):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} | ERROR | mark.pipeline | stage {stage} failed:\n{text}")


def _warn_about_wiring(stage: TrainStage, cfg: Any, configs: dict[str, Any]) -> None:
    """Warn when a stage reads an upstream model from another place than the one this
    pipeline's upstream stage writes to (e.g. a custom config dir that moved one of them)."""
    checks = {
        "train_rl": ("build_rag", lambda c: getattr(c.data, "rag_index_dir", None), "data.rag_index_dir"),
        "train_rlhf": ("train_mamba", lambda c: getattr(c.model, "base_checkpoint", None), "model.base_checkpoint"),
    }
    if stage.name not in checks or checks[stage.name][0] not in configs:
        return
    upstream_name, read, key = checks[stage.name]
    wanted = read(cfg)
    upstream_dir = Path(configs[upstream_name].paths.checkpoint_dir)
    if wanted is not None and upstream_dir.resolve() not in (Path(wanted).resolve(), Path(wanted).resolve().parent):
        log.warning("%s: %s is %s, but %s writes to %s", stage.name, key, wanted, upstream_name, upstream_dir)


class _ExportSettings(StrictModel):
    """What the export stage's outputs depend on besides the files it copies."""

    export_dir: str
    models: list[str]
    # what the stage writes per model; a new form makes an older export not current
    forms: list[str] = ["checkpoint", "hf"]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
