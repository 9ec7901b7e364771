"""Train tab: pick a target and config, edit its typed fields, start / stop / resume runs and
watch them (progress, curves from ``metrics.jsonl``, console tail). Logic: ``forms``, ``runs``."""

from __future__ import annotations

import gradio as gr

from src.board.forms import FORM_COLUMNS, clear_errors, form_rows, mark_error, resolve_config_path, target_configs, validate_form
from src.board.workspace import Workspace
from src.core.errors import MarkError


def loss_figure(curves: dict[str, list[tuple[float, float]]]):
    """A matplotlib figure of the loss curves (train and validation; every curve when there is
    no loss, e.g. RL rewards), or ``None`` before the first points."""
    shown = {name: points for name, points in curves.items() if name.endswith("loss")} or curves
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for name, points in shown.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, linewidth=1.4, label=name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def status_markdown(status: dict) -> str:
    """The progress line of a run: state, step/total, tokens/s, ETA."""
    step, total = status.get("step"), status.get("total")
    parts = [f"**{status['state']}**"]
    if step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    if status.get("tokens_per_s"):
        parts.append(f"{status['tokens_per_s']:,.0f} tokens/s")
    if status.get("eta_s") not in (None, 0.0):
        parts.append(f"ETA {status['eta_s']:.0f} s")
    points = sum(len(p) for p in status["curves"].values())
    parts.append(f"{points} curve points")
    text = " · ".join(parts) + f"\n\n`{status['command']}`"
    if status.get("error"):
        text += f"\n\n**The run failed (exit code {status['exit_code']}); its last lines:**\n\n```\n{status['error']}\n```"
    return text


def build(ws: Workspace) -> None:
    targets = list(target_configs())
    with gr.Row():
        target = gr.Dropdown(targets, value="mamba", label="target", elem_id="train-target", scale=1)
        config = gr.Textbox(value=target_configs()["mamba"].default_config, label="config file (inside the project or a --data-root)",
                            elem_id="train-config", scale=3)
        load = gr.Button("Load config", elem_id="train-load", scale=1)
    form = gr.Dataframe(headers=FORM_COLUMNS, datatype="str", type="array", interactive=True, static_columns=[0, 2, 3, 4, 5],
                        label="config (edit the value column; types, bounds and choices come from the typed config)",
                        elem_id="train-form", max_height=360, wrap=True)
    message = gr.Markdown(elem_id="train-message")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        resume = gr.Button("Resume", elem_id="train-resume")
    run_choice = gr.Dropdown([], label="runs (newest first; every Board tab and process sees the same)", elem_id="train-runs",
                             allow_custom_value=False)
    status = gr.Markdown(elem_id="train-status")
    plot = gr.Plot(label="loss curves (metrics.jsonl)", elem_id="train-plot", format="png")
    output = gr.Textbox(label="console (last lines)", lines=12, max_lines=12, elem_id="train-log", autoscroll=True)
    timer = gr.Timer(2.0)

    def default_config(name):
        return target_configs()[name].default_config

    def load_form(name, path):
        try:
            return form_rows(name, resolve_config_path(name, path, ws.guard)), ""
        except MarkError as err:
            return [], f"**error:** {err}"

    def run_ids(selected=None):
        ids = [r.id for r in ws.runs.list()]
        return gr.update(choices=ids, value=selected if selected in ids else (ids[0] if ids else None))

    def start_run(name, path, rows):
        try:
            config_path = resolve_config_path(name, path, ws.guard)
            overrides = []
            if rows:
                _, overrides = validate_form(name, config_path, rows, ws.guard)
            record = ws.runs.start(name, path, overrides)
        except MarkError as err:
            return (mark_error(rows, err) if rows else rows), f"**error:** {err}", run_ids()
        return clear_errors(rows) if rows else rows, f"started `{record.id}`", run_ids(record.id)

    def stop_run(run_id):
        try:
            ws.runs.stop(run_id)
            return f"SIGTERM sent to `{run_id}`: it finishes its step, writes a checkpoint and stops"
        except MarkError as err:
            return f"**error:** {err}"

    def resume_run(run_id):
        try:
            record = ws.runs.resume(run_id)
            return f"resumed `{record.id}` with --resume", run_ids(record.id)
        except MarkError as err:
            return f"**error:** {err}", run_ids(run_id)

    def refresh(run_id):
        if not run_id:
            return "no run selected", None, ""
        try:
            state = ws.runs.status(run_id)
        except MarkError as err:
            return f"**error:** {err}", None, ""
        return status_markdown(state), loss_figure(state["curves"]), state["output_tail"]

    target.change(default_config, target, config).then(load_form, [target, config], [form, message])
    load.click(load_form, [target, config], [form, message])
    start.click(start_run, [target, config, form], [form, message, run_choice])
    stop.click(stop_run, run_choice, message)
    resume.click(resume_run, run_choice, [message, run_choice])
    run_choice.change(refresh, run_choice, [status, plot, output])
    timer.tick(refresh, run_choice, [status, plot, output])
    timer.tick(lambda current: run_ids(current), run_choice, run_choice)
    return load_form, (target, config, form, message)
