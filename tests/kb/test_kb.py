"""glmtune kb: loading, splitting, the index on disk (reload, incremental update), retrieval, the QA prompt, eval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.errors import GlmtuneError
from glmtune.kb.evaluate import evaluate, read_questions
from glmtune.kb.index import KnowledgeBase, build, reciprocal_rank_fusion
from glmtune.kb.loaders import UnreadableFile, load
from glmtune.kb.qa import DEFAULT_PROMPT, NO_ANSWER, KnowledgeQA, read_prompt
from glmtune.kb.splitter import split
from kb_documents import (CHINESE, CHINESE_QUESTIONS, ENGLISH, ENGLISH_QUESTIONS, minilm_folder, write_documents,
                          write_questions)


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of ASCII text per page (pypdf cannot write text)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None,
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def top3_hits(kb: KnowledgeBase, questions: list[dict], retriever: str = "auto") -> list[bool]:
    report = evaluate(kb, [read_questions_one(q) for q in questions], top_k=3, retriever=retriever)
    missed = {m.q for m in report.misses}
    return [q["q"] not in missed for q in questions]


def read_questions_one(record: dict):
    from glmtune.kb.evaluate import Question

    return Question(record["q"], record["doc"], record["key"])


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    pytest.importorskip("all_minilm_l6_v2")
    return minilm_folder(tmp_path_factory.mktemp("minilm"))


# ---- loading and splitting ----

def test_every_format_loads(tmp_path):
    import docx

    (tmp_path / "a.pdf").write_bytes(minimal_pdf(["First page about owls", "Second page about bats"]))
    document = docx.Document()
    document.add_paragraph("Docx paragraph about herons")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "cell one", "cell two"
    document.save(tmp_path / "b.docx")
    (tmp_path / "c.jsonl").write_text('{"title": "t", "text": "jsonl text one"}\n\n"jsonl text two"\n', encoding="utf-8")
    (tmp_path / "d.html").write_text(ENGLISH["bread.html"], encoding="utf-8")
    (tmp_path / "e.txt").write_bytes("国标编码的中文".encode("gb18030"))

    assert [(s.where, s.text.strip()) for s in load(tmp_path / "a.pdf")] == [
        ("page 1", "First page about owls"), ("page 2", "Second page about bats")]
    assert load(tmp_path / "b.docx")[0].text == "Docx paragraph about herons\ncell one\tcell two"
    assert [(s.where, s.text) for s in load(tmp_path / "c.jsonl")] == [("line 1", "jsonl text one"),
                                                                         ("line 3", "jsonl text two")]
    html = load(tmp_path / "d.html")[0].text
    assert "carbon dioxide" in html and "tracking" not in html and "color" not in html
    assert load(tmp_path / "e.txt")[0].text == "国标编码的中文"


def test_splitter_keeps_positions_and_sizes():
    text = ("第一句话说的是猫。第二句话说的是狗！第三句？" * 10) + "\n\n" + "English sentence here. " * 20
    from glmtune.kb.loaders import Section

    chunks = split([Section(text, "page 2")], "x.md", chunk_size=60, chunk_overlap=10)
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(chunk.text) <= 60
        assert text[chunk.start:].startswith(chunk.text) and chunk.where == "page 2" and chunk.source == "x.md"
    assert any(chunk.text.endswith("。") or chunk.text.endswith("！") for chunk in chunks)  # sentence ends kept
    assert chunks[1].position() == f"page 2, char {chunks[1].start}"


def test_unreadable_files_are_reported_one_line_each_and_the_others_indexed(tmp_path):
    docs = write_documents(tmp_path / "docs", ENGLISH)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02\xff" * 10)
    (docs / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    (tmp_path / "notes.xyz").write_text("x")
    report = build([str(docs), str(tmp_path / "missing.md"), str(tmp_path / "notes.xyz")], str(tmp_path / "kb"),
                   show_progress=False)
    assert sorted(Path(p).name for p in report.added) == sorted(ENGLISH)
    assert len(report.errors) == 5 and all("\n" not in error for error in report.errors)
    joined = "\n".join(report.errors)
    for name in ("broken.pdf", "binary.txt", "bad.jsonl:2", "missing.md", "notes.xyz: unsupported file type"):
        assert name in joined
    assert KnowledgeBase.load(tmp_path / "kb").search("Why is Mars red?")[0].chunk.source.endswith("planets.txt")


# ---- the index on disk ----

def test_build_reload_and_incremental_update(tmp_path, monkeypatch):
    docs = write_documents(tmp_path / "docs", CHINESE)
    out = tmp_path / "kb"
    first = build([str(docs)], str(out), chunk_size=40, chunk_overlap=5, show_progress=False)
    assert len(first.added) == 3 and first.chunks > 3
    kb = KnowledgeBase.load(out)
    assert len(kb.chunks) == first.chunks
    before = kb.search("祁门红茶产自哪里")
    assert before and before[0].chunk.source.endswith("茶.txt")

    # Change one file, add one, remove one; count which files are read again.
    (docs / "茶.txt").write_text(CHINESE["茶.txt"] + "\n\n普洱茶产自云南，是后发酵茶。", encoding="utf-8")
    (docs / "新.md").write_text("黄山位于安徽南部，以奇松、怪石、云海闻名。", encoding="utf-8")
    (docs / "长城.md").unlink()
    from glmtune.kb import index as index_module

    read = []
    real_load = index_module.load
    monkeypatch.setattr(index_module, "load", lambda path: (read.append(path.name), real_load(path))[1])
    second = build([str(docs)], str(out), show_progress=False)  # settings come from the existing index
    assert sorted(read) == ["新.md", "茶.txt"]
    assert [Path(p).name for p in second.unchanged] == ["熊猫.md"]
    assert [Path(p).name for p in second.updated] == ["茶.txt"] and [Path(p).name for p in second.added] == ["新.md"]
    assert [Path(p).name for p in second.removed] == ["长城.md"]
    kb = KnowledgeBase.load(out)
    assert kb.manifest["chunk_size"] == 40
    assert kb.search("普洱茶产自哪里")[0].chunk.source.endswith("茶.txt")
    assert kb.search("黄山在哪里")[0].chunk.source.endswith("新.md")
    assert not any(p.chunk.source.endswith("长城.md") for p in kb.search("长城有多长", top_k=10))

    read.clear()
    third = build([str(docs)], str(out), show_progress=False)
    assert read == [] and len(third.unchanged) == 3
    assert not list(tmp_path.glob(".kb.*"))  # no staging folder left behind


def test_output_that_is_not_a_knowledge_base_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    docs = write_documents(tmp_path / "docs", ENGLISH)
    with pytest.raises(GlmtuneError, match="not a knowledge base"):
        build([str(docs)], str(tmp_path / "taken"), show_progress=False)
    assert (tmp_path / "taken" / "precious.txt").read_text() == "keep me"
    with pytest.raises(GlmtuneError, match="not a knowledge base"):
        KnowledgeBase.load(tmp_path / "docs")
    with pytest.raises(GlmtuneError, match="--chunk_overlap"):
        build([str(docs)], str(tmp_path / "kb"), chunk_size=10, chunk_overlap=10, show_progress=False)


# ---- retrieval ----

@pytest.mark.parametrize("documents, questions, chunk_size", [(CHINESE, CHINESE_QUESTIONS, 40),
                                                               (ENGLISH, ENGLISH_QUESTIONS, 100)],
                         ids=["chinese", "english"])
def test_lexical_default_finds_the_answer_passage_in_the_top_3(tmp_path, documents, questions, chunk_size):
    """Chunks of about one sentence, so that every question has to pick its passage among several per file."""
    docs = write_documents(tmp_path / "docs", documents)
    build([str(docs)], str(tmp_path / "kb"), chunk_size=chunk_size, chunk_overlap=10, show_progress=False)
    kb = KnowledgeBase.load(tmp_path / "kb")
    assert kb.resolve("auto") == "lexical"
    assert top3_hits(kb, questions) == [True] * len(questions)


def test_mixed_chinese_english_query(tmp_path):
    docs = write_documents(tmp_path / "docs", {**CHINESE, **ENGLISH})
    build([str(docs)], str(tmp_path / "kb"), chunk_size=50, chunk_overlap=10, show_progress=False)
    kb = KnowledgeBase.load(tmp_path / "kb")
    assert top3_hits(kb, [{"q": "Jupiter 的 Great Red Spot 是什么", "doc": "planets.txt", "key": "Great Red Spot"}]) == [True]
    assert kb.search("这个问题和文档毫无关系 zzzqqq") == []


def test_dense_and_hybrid_with_minilm(tmp_path, minilm):
    docs = write_documents(tmp_path / "docs", ENGLISH)
    out = tmp_path / "kb"
    report = build([str(docs)], str(out), chunk_size=120, chunk_overlap=20, embedding_model=str(minilm),
                   show_progress=False)
    assert report.embedded == report.chunks > 3
    kb = KnowledgeBase.load(out)
    assert kb.resolve("auto") == "hybrid"
    for retriever in ("dense", "hybrid", "lexical"):
        assert top3_hits(kb, ENGLISH_QUESTIONS, retriever) == [True] * len(ENGLISH_QUESTIONS), retriever
    # No shared word, same meaning: only the dense retriever can find it.
    assert kb.search("crimson world", top_k=1, retriever="dense")[0].chunk.text.startswith("Mars")
    dense = kb.search("Why is Mars red?", top_k=3, retriever="dense")
    assert all(-1.0 <= p.relevance <= 1.0 for p in dense) and dense[0].relevance > dense[-1].relevance

    (docs / "bread.html").write_text("<p>Rye bread is dense and dark.</p>", encoding="utf-8")
    second = build([str(docs)], str(out), show_progress=False)
    assert second.embedded == 1 and second.chunks == report.chunks - 1
    kb = KnowledgeBase.load(out)
    assert kb.search("dark rye", top_k=1, retriever="dense")[0].chunk.source.endswith("bread.html")
    assert kb.search("Why is Mars red?", top_k=1, retriever="dense")[0].chunk.text.startswith("Mars")


def test_lexical_index_refuses_dense_retrievers(tmp_path):
    build([str(write_documents(tmp_path / "docs", ENGLISH))], str(tmp_path / "kb"), show_progress=False)
    with pytest.raises(GlmtuneError, match="no dense index"):
        KnowledgeBase.load(tmp_path / "kb").search("Mars", retriever="dense")


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = reciprocal_rank_fusion([[(1, 9.0), (2, 5.0), (3, 1.0)], [(3, 0.9), (2, 0.8), (4, 0.1)]])
    assert {row for row, _ in fused[:2]} == {2, 3}  # in both lists, they beat the top of either list alone
    assert dict(fused)[3] == pytest.approx(1 / 63 + 1 / 61) and dict(fused)[1] == pytest.approx(1 / 61)
    assert {row for row, _ in fused} == {1, 2, 3, 4}


# ---- answering ----

def test_qa_fills_chatchat_prompt_and_refuses_below_threshold(tmp_path):
    build([str(write_documents(tmp_path / "docs", CHINESE))], str(tmp_path / "kb"), chunk_size=50,
          chunk_overlap=10, show_progress=False)
    kb = KnowledgeBase.load(tmp_path / "kb")
    qa = KnowledgeQA(kb, top_k=2)
    grounding = qa.ground("大熊猫吃什么？")
    assert 1 <= len(grounding.passages) <= 2 and grounding.prompt.startswith("<指令>根据已知信息")
    assert "食物几乎全是竹子" in grounding.prompt and "<问题>大熊猫吃什么？</问题>" in grounding.prompt
    assert grounding.sources()[0]["source"].endswith("熊猫.md") and "Sources:\n[1]" in grounding.sources_text()
    assert qa.ground("zzzqqq").prompt is None  # no shared word: refuse
    best = grounding.passages[0].relevance
    strict = KnowledgeQA(kb, top_k=2, score_threshold=best)
    refused = strict.ground("大熊猫吃什么？")
    assert refused.prompt is None and refused.passages == [] and NO_ANSWER == "根据已知信息无法回答该问题"

    template = tmp_path / "prompt.txt"
    template.write_text("Q: {question}\nUse {context} {braces}", encoding="utf-8")
    custom = KnowledgeQA(kb, template=read_prompt(str(template))).ground("大熊猫吃什么？")
    assert custom.prompt.startswith("Q: 大熊猫吃什么？\nUse ") and custom.prompt.endswith("{braces}")
    template.write_text("no placeholders", encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"lacks \{context\} and \{question\}"):
        read_prompt(str(template))
    assert read_prompt(None) == DEFAULT_PROMPT


# ---- the command line ----

def run_glmtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmtune", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_cli_build_search_eval(tmp_path):
    docs = write_documents(tmp_path / "docs", ENGLISH)
    (docs / "broken.pdf").write_bytes(b"not a pdf")
    out = str(tmp_path / "kb")
    built = run_glmtune("kb", "build", str(docs), "--output", out, "--chunk_size", "120", "--chunk_overlap", "20")
    assert built.returncode == 1  # one unreadable file; the others are indexed
    errors = [line for line in built.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.pdf" in errors[0]
    assert "3 file(s)" in built.stdout and "3 added" in built.stdout

    found = run_glmtune("kb", "search", out, "Why is Mars red?", "--top_k", "2", "--json")
    assert found.returncode == 0, found.stderr
    passages = json.loads(found.stdout)
    assert len(passages) == 2 and set(passages[0]) == {"source", "position", "text", "score"}
    assert passages[0]["source"].endswith("planets.txt") and "iron oxide" in passages[0]["text"]
    assert passages[0]["score"] >= passages[1]["score"]
    plain = run_glmtune("kb", "search", out, "Why is Mars red?", "--top_k", "1")
    assert "[1] " in plain.stdout and "planets.txt (char 0) score" in plain.stdout

    questions = write_questions(tmp_path / "q.jsonl", ENGLISH_QUESTIONS + [
        {"q": "Who wrote Hamlet?", "doc": "rivers.md", "key": "Shakespeare"}])
    scored = run_glmtune("kb", "eval", out, "--questions", str(questions), "--top_k", "3")
    assert scored.returncode == 0, scored.stderr
    assert "hit@3: 85.7% (6/7)" in scored.stdout and "miss@3: 'Who wrote Hamlet?'" in scored.stdout

    (tmp_path / "bad.jsonl").write_text('{"q": "x"}\n', encoding="utf-8")
    bad = run_glmtune("kb", "eval", out, "--questions", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 2 and "bad.jsonl:1: needs non-empty string fields q, doc and key" in bad.stderr
    assert read_questions(str(questions))[0].doc == "rivers.md"


def test_missing_extra_names_the_install_command(monkeypatch):
    from glmtune.kb.lexical import LexicalIndex

    monkeypatch.setitem(sys.modules, "bm25s", None)  # None in sys.modules makes `import bm25s` fail
    with pytest.raises(GlmtuneError, match=r"needs bm25s: pip install 'glmtune\[kb\]'"):
        LexicalIndex.build([["word"]])
