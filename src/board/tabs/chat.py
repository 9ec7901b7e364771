"""Chat tab: pick a model, RAG on/off (top_k, mode), sampling settings; the answer streams,
its evidence sentences and sources sit beside it; the conversation keeps its history.
Ratings close the loop: rate an answer up / down, or sample two and pick the better one;
pairs go to the preference file the DPO stage reads. Logic: ``chat``, ``preferences``."""

from __future__ import annotations

import html

import gradio as gr

from src.api.generation import GenerationParams
from src.board.chat import sample_pair, stream_answer
from src.board.preferences import count_pairs, record_comparison, record_rating
from src.board.workspace import Workspace
from src.core.errors import MarkError


def evidence_markdown(evidence: list[dict], sources: list[dict]) -> str:
    if not evidence and not sources:
        return "(no retrieval: RAG is off)"
    lines = ["**Evidence** (retrieved sentences closest to the question)"]
    lines += [f"- {html.escape(e['sentence'])} — `{e['doc_id']}` ({e['score']:.3f})" for e in evidence]
    lines += ["", "**Sources**"]
    lines += [f"{i}. `{s['doc_id']}` {html.escape(str(s['source']))} (score {s['score']:.4f})" for i, s in enumerate(sources, 1)]
    return "\n".join(lines)


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"] if isinstance(m["content"], str) else str(m["content"])) for m in messages or []]


def build(ws: Workspace) -> None:
    with gr.Row():
        model = gr.Dropdown(ws.models.choices(), value="rlhf", label="model", elem_id="chat-model", allow_custom_value=True)
        rag = gr.Checkbox(value=True, label="RAG (answer from the knowledge base)", elem_id="chat-rag")
        top_k = gr.Slider(1, 10, value=3, step=1, label="top_k", elem_id="chat-topk")
        mode = gr.Radio(["dense", "bm25", "hybrid"], value="hybrid", label="search mode", elem_id="chat-mode")
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0: greedy)", elem_id="chat-temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top_p", elem_id="chat-top-p")
        max_tokens = gr.Slider(8, 256, value=64, step=8, label="max new tokens", elem_id="chat-max-tokens")
    with gr.Row():
        with gr.Column(scale=3):
            bot = gr.Chatbot(label="conversation", elem_id="chat-bot", height=380, feedback_options=None)
            question = gr.Textbox(label="question", placeholder="Ask about the knowledge base", elem_id="chat-input")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                up = gr.Button("+1 good answer", elem_id="chat-up")
                down = gr.Button("-1 bad answer", elem_id="chat-down")
                clear = gr.Button("New conversation", elem_id="chat-clear")
        with gr.Column(scale=2):
            evidence = gr.Markdown(elem_id="chat-evidence")
    gr.Markdown("### Compare two sampled answers")
    with gr.Row():
        sample = gr.Button("Sample two answers (to the question box, else the last question)", elem_id="chat-sample")
    with gr.Row():
        answer_a = gr.Textbox(label="answer A", lines=4, interactive=False, elem_id="chat-a")
        answer_b = gr.Textbox(label="answer B", lines=4, interactive=False, elem_id="chat-b")
    with gr.Row():
        pick_a = gr.Button("A is better", elem_id="chat-pick-a")
        pick_b = gr.Button("B is better", elem_id="chat-pick-b")
    status = gr.Markdown(elem_id="chat-status")
    last = gr.State({})  # this conversation's last answer: {prompt, answer, model}
    pair = gr.State({})  # the two sampled answers: {prompt, a, b}

    def params(t, p, n):
        return GenerationParams(max_new_tokens=int(n), temperature=float(t), top_p=float(p))

    async def ask(text, messages, name, use_rag, k, how, t, p, n):
        messages = list(messages or [])
        history = _turns(messages)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        try:
            async for update in stream_answer(ws.models, text, history, name, use_rag, int(k), how, params(t, p, n)):
                messages[-1] = {"role": "assistant", "content": update.text}
                shown = evidence_markdown(update.evidence, update.sources)
                state = {"prompt": update.prompt, "answer": update.text, "model": name, "question": text}
                note = f"answer by `{name}` ({update.finish_reason})" if update.done else f"`{name}` is answering..."
                yield messages, shown, state, "", note
        except MarkError as err:
            messages[-1] = {"role": "assistant", "content": f"error: {err}"}
            yield messages, "", {}, "", f"**error:** {err}"

    def rate(state, good):
        if not state.get("answer"):
            return "**error:** no answer to rate yet"
        try:
            pairs = record_rating(ws.preferences_file, state["prompt"], state["answer"], good, state.get("model", ""))
        except MarkError as err:
            return f"**error:** {err}"
        made = f"; {len(pairs)} new pair(s)" if pairs else " (a pair is made when another answer to this prompt is rated the other way)"
        return (f"rated {'up' if good else 'down'}{made}: `{ws.guard.relative(ws.preferences_file)}` holds "
                f"{count_pairs(ws.preferences_file)} pairs")

    async def sample_two(text, state, messages, name, use_rag, k, how, t, p, n):
        history = _turns(messages)
        if not text.strip() and state.get("question"):  # the question just answered, after the turns before it
            text, history = state["question"], history[:-2]
        try:
            prompt, a, b = await sample_pair(ws.models, text, history, name, use_rag, int(k), how, params(t, p, n))
        except MarkError as err:
            return "", "", {}, f"**error:** {err}"
        return a, b, {"prompt": prompt, "a": a, "b": b}, "pick the better answer"

    def pick(state, first_better):
        if not state.get("prompt"):
            return "**error:** sample two answers first"
        chosen, rejected = (state["a"], state["b"]) if first_better else (state["b"], state["a"])
        try:
            record_comparison(ws.preferences_file, state["prompt"], chosen, rejected)
        except MarkError as err:
            return f"**error:** {err}"
        return f"pair written: `{ws.guard.relative(ws.preferences_file)}` holds {count_pairs(ws.preferences_file)} pairs"

    settings = [model, rag, top_k, mode, temperature, top_p, max_tokens]
    send.click(ask, [question, bot, *settings], [bot, evidence, last, question, status])
    question.submit(ask, [question, bot, *settings], [bot, evidence, last, question, status])
    up.click(lambda s: rate(s, True), last, status)
    down.click(lambda s: rate(s, False), last, status)
    clear.click(lambda: ([], "", {}, ""), None, [bot, evidence, last, status])
    sample.click(sample_two, [question, last, bot, *settings], [answer_a, answer_b, pair, status])
    pick_a.click(lambda s: pick(s, True), pair, status)
    pick_b.click(lambda s: pick(s, False), pair, status)
    return (lambda: gr.update(choices=ws.models.choices())), (model,)
