"""Export tab: a trained model as a transformers folder (HF safetensors) or a GGUF file for
llama.cpp, through the function ``mark export`` runs; shows the output and the command."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import gradio as gr

from src.board.workspace import Workspace
from src.core.errors import MarkError
from src.core.load_model import MODELS


def export_command(model: str, fmt: str, output: str, source: str | None, dtype: str) -> list[str]:
    """The ``mark export`` command line of an export (run from the project folder)."""
    argv = [sys.executable, "-m", "src.training.orchestrator", "export", "--model", model, "--format", fmt, "--output", output]
    if source:
        argv += ["--source", source]
    if fmt == "gguf":
        argv += ["--dtype", dtype]
    return argv


def run_export(ws: Workspace, model: str, fmt: str, output: str, source: str, dtype: str) -> str:
    """Export with ``src.pipelines.export.export_model`` (what the command runs); Markdown of
    the output folder or file and the equivalent command line."""
    from src.pipelines.export import export_model

    out = ws.guard.resolve(output or ws.exports_dir / f"{model}-{fmt}", what="output")
    src_path = ws.guard.resolve(source, must_exist=True, what="source") if source and source.strip() else \
        ws.checkpoints_dir / Path(MODELS[model].default_dir).name
    result = export_model(model, fmt, out, src_path, dtype)
    argv = export_command(model, fmt, ws.guard.relative(out), ws.guard.relative(src_path), dtype)
    written = "\n".join(f"- {kind}: `{path}`" for kind, path in result["outputs"].items())
    numbers = ", ".join(f"{k} {v}" for k, v in result["metrics"].items())
    return f"**exported** ({numbers})\n\n{written}\n\ncommand:\n\n```\ncd {shlex.quote(str(ws.guard.project))} && {shlex.join(argv)}\n```"


def build(ws: Workspace) -> None:
    with gr.Row():
        model = gr.Dropdown(["mamba", "rlhf", "transformer"], value="rlhf", label="model", elem_id="export-model")
        fmt = gr.Radio(["hf", "gguf"], value="hf", label="format", elem_id="export-format")
        dtype = gr.Dropdown(["f32", "f16", "q8_0"], value="f32", label="GGUF type", elem_id="export-dtype")
    output = gr.Textbox(label="output folder (hf) or .gguf file / folder (gguf); empty: exports/<model>-<format>", elem_id="export-output")
    source = gr.Textbox(label="source checkpoint file or folder (empty: the model's checkpoint folder)", elem_id="export-source")
    go = gr.Button("Export", variant="primary", elem_id="export-run")
    result = gr.Markdown(elem_id="export-result")

    def export(name, form, path, src, kind):
        try:
            return run_export(ws, name, form, path, src, kind)
        except MarkError as err:
            return f"**error:** {err}"

    go.click(export, [model, fmt, output, source, dtype], result)
