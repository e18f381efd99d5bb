"""Files to text: .txt .md .rst .html .pdf .docx .jsonl. Each file gives sections (a PDF page, a JSON line,
or the whole file) that the splitter cuts into chunks; a section's ``where`` says where it came from."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glmtune.errors import GlmtuneError
from glmtune.kb import require


class UnreadableFile(GlmtuneError):
    """One file that could not be read; the build reports it and indexes the others."""


@dataclass
class Section:
    text: str
    where: str = ""  # "page 3", "line 12", or "" for the whole file


def _plain(path: Path) -> list[Section]:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise UnreadableFile(f"{path}: binary data, not text")
    for encoding in ("utf-8-sig", "gb18030"):  # Chinese text files are often GBK/GB18030, not UTF-8
        try:
            return [Section(data.decode(encoding))]
        except UnicodeDecodeError:
            continue
    raise UnreadableFile(f"{path}: neither UTF-8 nor GB18030 text")


def _html(path: Path) -> list[Section]:
    bs4 = require("bs4", "beautifulsoup4")
    soup = bs4.BeautifulSoup(_plain(path)[0].text, "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return [Section("\n".join(line for line in lines if line))]


def _pdf(path: Path) -> list[Section]:
    pypdf = require("pypdf")
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about a broken file repeat our one error line
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted:
            raise UnreadableFile(f"{path}: the PDF is encrypted")
        return [Section(page.extract_text() or "", f"page {number}") for number, page in enumerate(reader.pages, 1)]
    except UnreadableFile:
        raise
    except Exception as error:  # pypdf raises many kinds of errors for a broken file
        raise UnreadableFile(f"{path}: not a readable PDF ({error})") from None


def _docx(path: Path) -> list[Section]:
    docx = require("docx", "python-docx")
    try:
        document = docx.Document(str(path))
    except Exception as error:  # python-docx raises zip/XML errors of several kinds
        raise UnreadableFile(f"{path}: not a readable .docx ({error})") from None
    parts = [paragraph.text for paragraph in document.paragraphs]
    for table in document.tables:
        parts += ["\t".join(cell.text for cell in row.cells) for row in table.rows]
    return [Section("\n".join(part for part in parts if part.strip()))]


TEXT_KEYS = ("text", "content", "page_content")


def _jsonl(path: Path) -> list[Section]:
    sections = []
    for number, line in enumerate(_plain(path)[0].text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UnreadableFile(f"{path}:{number}: not JSON ({error.msg})") from None
        if isinstance(record, str):
            text = record
        elif isinstance(record, dict):
            key = next((k for k in TEXT_KEYS if isinstance(record.get(k), str)), None)
            text = record[key] if key else "\n".join(f"{k}: {v}" for k, v in record.items() if isinstance(v, str))
        else:
            raise UnreadableFile(f"{path}:{number}: expected an object or a string")
        sections.append(Section(text, f"line {number}"))
    return sections


LOADERS: dict[str, Callable[[Path], list[Section]]] = {
    ".txt": _plain, ".md": _plain, ".markdown": _plain, ".rst": _plain,
    ".html": _html, ".htm": _html, ".pdf": _pdf, ".docx": _docx, ".jsonl": _jsonl,
}


def load(path: Path) -> list[Section]:
    """The file's sections; ``UnreadableFile`` names the file and the reason."""
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise UnreadableFile(f"{path}: unsupported file type (supported: {', '.join(sorted(LOADERS))})")
    try:
        return loader(path)
    except OSError as error:
        raise UnreadableFile(f"{path}: {error.strerror or error}") from None


def collect_files(paths: list[str]) -> tuple[list[Path], list[str]]:
    """The files named and those in the named folders (supported types only), and an error per missing path."""
    files: list[Path] = []
    errors: list[str] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{name}: no such file or folder")
    unique = list(dict.fromkeys(files))
    return unique, errors
