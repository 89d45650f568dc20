"""Clean English text shipped with every Python: the docstrings of the standard library's own ``.py`` files.

Read with `ast` (nothing is imported or executed) from ``sysconfig.get_paths()["stdlib"]``. Packages
Debian ships apart from ``libpython3.x-stdlib`` or that newer Pythons removed (``tkinter``, ``idlelib``,
``turtledemo``, ``lib2to3``, ``distutils``, ``ensurepip``), every test package, and ``pydoc_data`` (the text
of the default corpus, ``corpus.py``) are skipped, so any Debian or python.org build of Python 3.10+ has
the files and none of this text is the corpus's. The texts change between Python releases.

Used by ``pretrain.py`` (the default run's pre-training text) and ``benchmarks/reweighting_quality_data.py``.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIPPED_PARTS = {
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "distutils",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",
    "encodings",
    "__phello__",
}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(packages: tuple[str, ...] | None = None) -> Iterator[tuple[str, ast.Module]]:
    """(dotted module name, parsed tree) of the standard library's source files, sorted by path; only the
    files under ``packages`` (top-level names) if given. Test packages and ``SKIPPED_PARTS`` are left out."""
    root = stdlib_dir()
    paths = (
        root.rglob("*.py")
        if packages is None
        else (p for name in packages for p in [root / f"{name}.py", *(root / name).rglob("*.py")] if p.is_file())
    )
    for path in sorted(paths):
        parts = path.relative_to(root).with_suffix("").parts
        if SKIPPED_PARTS & set(parts) or any(p.startswith("test") for p in parts):
            continue
        if packages is not None and parts[0] not in packages:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a file written for another Python
            continue
        yield ".".join(p for p in parts if p != "__init__"), tree


def words(text: str) -> list[str]:
    return " ".join(text.split()).split()


def docstring_documents(packages: tuple[str, ...] | None, max_words: int = 48, min_words: int = 12) -> list[str]:
    """The docstrings of every module, class and function under ``packages`` (None: the whole standard
    library), split at blank lines into paragraphs (whitespace collapsed) and packed greedily into documents
    of at most ``max_words`` words (longer paragraphs cut); documents under ``min_words`` dropped, exact
    repeats kept once."""
    documents, seen = [], set()
    for _, tree in stdlib_files(packages):
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            current: list[str] = []
            for paragraph in doc.split("\n\n"):
                paragraph_words = words(paragraph)
                for start in range(0, len(paragraph_words), max_words):
                    piece = paragraph_words[start : start + max_words]
                    if current and len(current) + len(piece) > max_words:
                        documents.append(" ".join(current))
                        current = []
                    current.extend(piece)
            if current:
                documents.append(" ".join(current))
    kept = []
    for text in documents:
        if len(text.split()) >= min_words and text not in seen:
            seen.add(text)
            kept.append(text)
    return kept


def texts_hash(texts: list[str]) -> str:
    """sha256 of the texts in order: what a cache built from them keys on."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()
