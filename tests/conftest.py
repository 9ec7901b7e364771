"""Shared test setup: offline Hugging Face hub, and MARK's sample corpus built once per session."""

import os

# Tests never touch the network: the hub resolves local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from src.data.prepare import prepare_sample_data  # noqa: E402


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the full sample corpus of ``src.data.prepare`` (about 1 s to build).

    It has documents.jsonl, lm_{train,val}.jsonl, classification_{train,val,test}.jsonl,
    labels.json, rag_eval.jsonl, sft_{train,val,test}.jsonl, preferences_{train,val,test}.jsonl and
    manifest.json. It is shared by the whole session: read it, don't modify it (copy it
    to ``tmp_path`` first when a test needs to change files).
    """
    output_dir = tmp_path_factory.mktemp("data")
    prepare_sample_data(output_dir)
    return output_dir


def write_pdf(path: Path, pages: list[list[str]], title: str | None = None) -> Path:
    """A real PDF with one page per entry of ``pages`` (lines of Helvetica text), built by hand."""
    fonts = 3 + 2 * len(pages)  # object number of the font
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode()]
    for i, lines in enumerate(pages):
        text_ops = " T* ".join(f"({line}) Tj" for line in lines)
        content = f"BT /F1 12 Tf 72 720 Td 14 TL {text_ops} ET".encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {fonts} 0 R >> >> "
            f"/Contents {4 + 2 * i} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    info = ""
    if title:
        objects.append(f"<< /Title ({title}) >>".encode("latin-1"))
        info = f" /Info {len(objects)} 0 R"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, info.encode(), xref)
    path.write_bytes(bytes(out))
    return path


@pytest.fixture
def pdf_writer():
    """:func:`write_pdf`: ``pdf_writer(path, [[page 1 lines], [page 2 lines]], title=None) -> path``."""
    return write_pdf
