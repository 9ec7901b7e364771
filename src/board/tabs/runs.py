"""Runs tab: every run under the checkpoint and log folders, its config, final and best metrics
next to the baselines, curves, the Markdown report with its PNGs, two runs on one plot.
Logic: ``history`` (on ``src.training.report``)."""

from __future__ import annotations

import re
import time

import gradio as gr

from src.board.history import compare_plot, find_runs, run_details, shared_metrics, write_report
from src.board.workspace import Workspace
from src.training.report import plot_curves


def build(ws: Workspace) -> None:
    with gr.Row():
        run = gr.Dropdown([], label="run (log folder)", elem_id="runs-run", scale=4)
        refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            metrics = gr.Markdown(elem_id="runs-metrics")
            evaluation = gr.Markdown(elem_id="runs-evaluation")
        with gr.Column(scale=2):
            curves = gr.Image(label="curves", type="filepath", elem_id="runs-curves", interactive=False)
            config = gr.Code(label="config.yaml", language="yaml", elem_id="runs-config", max_lines=25)
    gr.Markdown("### Compare two runs")
    with gr.Row():
        first = gr.Dropdown([], label="run A", elem_id="runs-a")
        second = gr.Dropdown([], label="run B", elem_id="runs-b")
        metric = gr.Dropdown([], label="curve", elem_id="runs-metric", allow_custom_value=True)
        compare = gr.Button("Compare", elem_id="runs-compare")
    compared = gr.Image(label="A vs B", type="filepath", elem_id="runs-compared", interactive=False)
    gr.Markdown("### Report (`mark report`)")
    report_button = gr.Button("Write the report", elem_id="runs-report-button")
    report = gr.Markdown(elem_id="runs-report")
    gallery = gr.Gallery(label="report plots", elem_id="runs-gallery", columns=2, height=420)

    def runs_by_label():
        return {r.label: r for r in find_runs(ws.run_folders(), ws.guard)}

    def list_runs(current=None):
        labels = list(runs_by_label())
        value = current if current in labels else (labels[0] if labels else None)
        return (gr.update(choices=labels, value=value), gr.update(choices=labels, value=labels[0] if labels else None),
                gr.update(choices=labels, value=labels[1] if len(labels) > 1 else None))

    def show(label):
        found = runs_by_label().get(label)
        if found is None:
            return "(no run)", "", None, ""
        details = run_details(found)
        name = re.sub(r"[^\w.-]+", "_", label)
        png = plot_curves(label, details["curves"], ws.reports_dir / "runs" / f"{name}_curves.png")
        title = f"**{label}**: last step {details['last_step']}" + (f", checkpoints in `{found.checkpoint_dir}`" if found.checkpoint_dir else "")
        return f"{title}\n\n{details['metrics']}", details["evaluation"], str(png) if png else None, details["config"]

    def metrics_of(a, b):
        found = runs_by_label()
        chosen = [found[x] for x in (a, b) if x in found]
        names = shared_metrics(chosen) if chosen else []
        return gr.update(choices=names, value=names[0] if names else None)

    def compare_runs(a, b, name):
        found = runs_by_label()
        chosen = [found[x] for x in (a, b) if x in found]
        if not chosen or not name:
            return None
        png = compare_plot(chosen, name, ws.reports_dir / "runs" / f"compare_{int(time.time() * 1000)}.png")
        return str(png) if png else None

    def report_now():
        text, plots = write_report(ws.logs_dir, ws.checkpoints_dir, ws.reports_dir)
        text = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", text)  # the PNGs are in the gallery below
        return text, [str(p) for p in plots]

    refresh.click(list_runs, run, [run, first, second])
    run.change(show, run, [metrics, evaluation, curves, config])
    for box in (first, second):
        box.change(metrics_of, [first, second], metric)
    compare.click(compare_runs, [first, second, metric], compared)
    report_button.click(report_now, None, [report, gallery])
    return list_runs, (run, first, second)
