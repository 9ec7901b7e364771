"""Knowledge tab: the RAG index's size and settings; add a folder or uploaded files, sync,
delete by id; browse a document's chunks; search dense / bm25 / hybrid with each hit's doc
id, source, score and the matched text highlighted. Logic: ``knowledge``."""

from __future__ import annotations

import html

import gradio as gr

from src.board.knowledge import store_uploads
from src.board.workspace import Workspace
from src.core.errors import MarkError

SEARCH_MODES = ["dense", "bm25", "hybrid"]


def info_markdown(info: dict) -> str:
    return (
        f"**{info['documents']:,} documents, {info['chunks']:,} chunks** in `{info['folder']}` · embedding "
        f"`{info['embedding_model']}` ({info['embedding_dim']} dims) · chunks of {info['chunk_size']} word-pieces, "
        f"overlap {info['chunk_overlap']} · {info['index_type']} index · default search {info['search_mode']}, top {info['top_k']}"
    )


def hits_html(hits: list[dict]) -> str:
    """Search hits as HTML cards: rank, doc id, source, score, highlighted chunk text."""
    if not hits:
        return "<p>no document matches</p>"
    cards = []
    for hit in hits:
        scores = f"score {hit['score']:.4f}"
        if hit.get("dense_score") is not None:
            scores += f" · dense {hit['dense_score']:.4f}"
        if hit.get("bm25_score") is not None:
            scores += f" · bm25 {hit['bm25_score']:.4f}"
        cards.append(
            f"<div class='kb-hit' style='margin-bottom:10px'><b>#{hit['rank']} {html.escape(hit['doc_id'])}</b> "
            f"<small>{html.escape(str(hit['source']))} · {scores}</small><br>{hit['highlighted']}</div>"
        )
    return "\n".join(cards)


def build(ws: Workspace) -> None:
    info = gr.Markdown(elem_id="kb-info")
    with gr.Row():
        with gr.Column():
            folder = gr.Textbox(label="add a folder or file with `mark ingest`'s readers (inside the project or a --data-root)",
                                elem_id="kb-path")
            with gr.Row():
                add = gr.Button("Add", elem_id="kb-add")
                sync = gr.Button("Sync (the index then holds only these files)", elem_id="kb-sync")
            uploads = gr.File(label=f"or upload files (the formats `mark ingest` reads; at most {ws.settings.max_upload_bytes // 1024 // 1024} MB each)",
                              file_count="multiple", type="filepath", elem_id="kb-upload")
            add_uploads = gr.Button("Add uploaded files", elem_id="kb-add-uploads")
        with gr.Column():
            delete_ids = gr.Textbox(label="delete documents (ids, comma-separated)", elem_id="kb-delete-ids")
            delete = gr.Button("Delete", variant="stop", elem_id="kb-delete")
            doc_id = gr.Textbox(label="browse the chunks of document", elem_id="kb-doc")
            browse = gr.Button("Show chunks", elem_id="kb-browse")
    message = gr.Markdown(elem_id="kb-message")
    chunks = gr.Dataframe(headers=["chunk", "start", "end", "text"], datatype="str", type="array", interactive=False,
                          elem_id="kb-chunks", wrap=True, max_height=300)
    gr.Markdown("### Search")
    with gr.Row():
        query = gr.Textbox(label="query", elem_id="kb-query", scale=4)
        mode = gr.Radio(SEARCH_MODES, value="hybrid", label="mode", elem_id="kb-mode", scale=2)
        top_k = gr.Slider(1, 20, value=5, step=1, label="top_k", elem_id="kb-topk", scale=1)
        search = gr.Button("Search", variant="primary", elem_id="kb-search", scale=1)
    results = gr.HTML(elem_id="kb-results")
    documents = gr.Dataframe(headers=["doc id", "source", "chunks", "characters"], datatype="str", type="array",
                             interactive=False, label="documents", elem_id="kb-documents", max_height=300)

    def describe():
        try:
            return info_markdown(ws.knowledge.info()), ws.knowledge.documents()
        except MarkError as err:
            return f"**error:** {err}", []

    def report(counts: dict) -> str:
        text = (f"added {counts['added']}, updated {counts['updated']}, deleted {counts['deleted']}, "
                f"unchanged {counts['unchanged']} ({counts['chunks_added']} chunks embedded)")
        if counts["skipped"]:
            text += "\n\nskipped:\n" + "\n".join(f"- `{path}`: {reason}" for path, reason in counts["skipped"])
        return text

    def add_path(path, with_sync=False):
        try:
            counts = ws.knowledge.add(path, sync=with_sync)
        except MarkError as err:
            return (f"**error:** {err}", *describe())
        return (report(counts), *describe())

    def add_files(files):
        if not files:
            return ("**error:** no file uploaded", *describe())
        try:
            stored = store_uploads(files, ws.uploads_dir, ws.settings.max_upload_bytes)
            counts = {"added": 0, "updated": 0, "deleted": 0, "unchanged": 0, "chunks_added": 0, "skipped": []}
            for path in stored:
                for key, value in ws.knowledge.add(path).items():
                    counts[key] += value
        except (MarkError, OSError) as err:
            return (f"**error:** {err}", *describe())
        return (report(counts), *describe())

    def delete_docs(ids):
        try:
            removed = ws.knowledge.delete(ids.split(","))
        except MarkError as err:
            return (f"**error:** {err}", *describe())
        return (f"deleted ({removed} chunks removed)", *describe())

    def show_chunks(doc):
        try:
            return "", [[c["chunk_index"], c["start_char"], c["end_char"], c["text"]] for c in ws.knowledge.chunks(doc.strip())]
        except MarkError as err:
            return f"**error:** {err}", []

    async def run_search(text, how, k):
        try:
            return hits_html(await ws.knowledge.search(text, how, int(k))), ""
        except MarkError as err:
            return "", f"**error:** {err}"

    outputs = [message, info, documents]
    add.click(lambda p: add_path(p), folder, outputs)
    sync.click(lambda p: add_path(p, True), folder, outputs)
    add_uploads.click(add_files, uploads, outputs)
    delete.click(delete_docs, delete_ids, outputs)
    browse.click(show_chunks, doc_id, [message, chunks])
    search.click(run_search, [query, mode, top_k], [results, message])
    query.submit(run_search, [query, mode, top_k], [results, message])
    return describe, (info, documents)
