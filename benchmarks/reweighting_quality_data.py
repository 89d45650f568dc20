"""The two data sets of benchmarks/reweighting_quality.py, built offline from the standard library's own source.

Every text comes from the ``.py`` files of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), read with :mod:`ast` (nothing is imported
or executed). Packages Debian ships apart from ``libpython3.x-stdlib`` or that
newer Pythons removed (``tkinter``, ``idlelib``, ``turtledemo``, ``lib2to3``,
``distutils``, ``ensurepip``) and every test package are skipped, so any Debian
or python.org build of Python 3.10+ has the files. The texts change between
Python releases: results are comparable for one Python version (reported).

**Instruction tuning** (:func:`instruction_task`). One example per public
module-level function or public method with a docstring: the prompt is
``What does `module.Class.name(arg, ...)` do?`` (the argument names from the
signature, a method's ``self``/``cls`` left out), the response the signature
again and the docstring's first paragraph (whitespace collapsed, at most
``max_response_words`` words), as ``help()`` shows a function:
``module.Class.name(arg, ...): <first paragraph>``.
Pairs whose docstring paragraph or prompt occurs more than once (``Emit a
record.``) are dropped, so every response belongs to exactly one prompt. ``heldout`` (fixed across seeds) and
``meta`` (by seed) are clean; in ``train`` a fixed share (``corruption_rate``,
30 %) of the responses are replaced, the two kinds in equal numbers:

- ``other_prompt``: the response of a random other function of another module;
- ``wrong_same_module``: the response of another function of the *same* module
  (on topic, plausible, wrong).

**Domain targeting** (:func:`domain_task`). The docstrings of all modules,
classes and functions (public or not) of eight groups of packages, one source
each (``DOMAIN_SOURCES``), split into paragraphs and packed into documents of
at most ``max_words`` words. The target domain is ``TARGET_SOURCES`` (email and
the web packages: the internet-protocol code); ``meta`` and ``heldout`` come
from the target sources only, ``train`` holds every source's remaining
documents in their natural proportions.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIPPED_PARTS = {"idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "site-packages",
                 "dist-packages", "__pycache__", "pydoc_data", "encodings", "__phello__"}  # fmt: skip
INSTRUCTION_CORRUPTIONS = ("other_prompt", "wrong_same_module")
DOMAIN_SOURCES: dict[str, tuple[str, ...]] = {
    "email": ("email",),
    "web": ("http", "urllib", "wsgiref", "xmlrpc"),
    "asyncio": ("asyncio",),
    "concurrency": ("multiprocessing", "concurrent"),
    "importlib": ("importlib",),
    "logging": ("logging",),
    "unittest": ("unittest",),
    "xml": ("xml",),
}
TARGET_SOURCES = ("email", "web")


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


def _words(text: str) -> list[str]:
    return " ".join(text.split()).split()


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """Module-level functions and methods of public module-level classes: (qualified name, node, is a method)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{member.name}", member, True


def instruction_pairs(max_response_words: int = 40) -> list[dict]:
    """Every (prompt, response) pair: dicts with ``module``, ``name``, ``prompt``, ``response``; sorted, unique
    responses only."""
    return [dict(p) for p in _instruction_pairs(max_response_words)]


@functools.lru_cache(maxsize=2)
def _instruction_pairs(max_response_words: int) -> tuple[dict, ...]:
    pairs = []
    for module, tree in stdlib_files():
        for name, node, method in _functions(tree):
            doc = ast.get_docstring(node)
            if name.split(".")[-1].startswith("_") or not doc:
                continue
            words = _words(doc.strip().split("\n\n")[0])[:max_response_words]
            if len(words) < 3:
                continue
            args = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
            args = args[1:] if method and args and args[0] in ("self", "cls") else args
            signature = f"{module}.{name}({', '.join(args)})"
            pairs.append({"module": module, "name": name, "prompt": f"What does `{signature}` do?",
                          "response": f"{signature}: {' '.join(words)}", "doc": " ".join(words)})  # fmt: skip
    counts: dict[str, int] = {}
    for pair in pairs:  # a docstring or a prompt that occurs twice (a function defined in both branches of an if)
        for key in (pair.pop("doc"), pair["prompt"]):
            counts[key] = counts.get(key, 0) + 1
    return tuple(p for p in pairs if counts[p["response"].split(": ", 1)[1]] == counts[p["prompt"]] == 1)


def instruction_task(seed: int, corruption_rate: float = 0.3, heldout: int = 400, meta: int = 100) -> dict:
    """Splits of the instruction-tuning task: ``{"train", "meta", "heldout"}`` -> rows with ``prompt``,
    ``response``, ``module``, ``corrupted`` (bool) and ``corruption`` (kind, "" if clean).

    ``heldout`` is drawn with a fixed seed (every seed reports on the same pairs), ``meta`` and the
    corruption with ``seed``; exactly ``round(corruption_rate * len(train))`` train responses are replaced,
    the kinds alternating (counts differ by at most one), each replacement another train pair's response."""
    pairs = instruction_pairs()
    random.Random("instruction/heldout").shuffle(pairs)
    splits = {"heldout": pairs[:heldout]}
    rest = pairs[heldout:]
    rng = random.Random(f"instruction/{seed}")
    rng.shuffle(rest)
    splits["meta"], train = rest[:meta], rest[meta:]
    by_module: dict[str, list[int]] = {}
    for i, pair in enumerate(train):
        by_module.setdefault(pair["module"], []).append(i)
    chosen = rng.sample(range(len(train)), round(corruption_rate * len(train)))
    kind_of = {i: INSTRUCTION_CORRUPTIONS[k % 2] for k, i in enumerate(chosen)}
    rows = []
    for i, pair in enumerate(train):
        kind = kind_of.get(i, "")
        if kind == "wrong_same_module" and len(by_module[pair["module"]]) < 2:
            kind = "other_prompt"  # a module with one function has no sibling to answer for it
        response = pair["response"]
        if kind == "other_prompt":
            j = rng.choice([j for j in range(len(train)) if train[j]["module"] != pair["module"]])
            response = train[j]["response"]
        elif kind:
            response = train[rng.choice([j for j in by_module[pair["module"]] if j != i])]["response"]
        rows.append({**pair, "response": response, "corrupted": bool(kind), "corruption": kind})
    splits["train"] = rows
    for name in ("heldout", "meta"):
        splits[name] = [{**p, "corrupted": False, "corruption": ""} for p in splits[name]]
    return splits


def docstring_documents(packages: tuple[str, ...], max_words: int = 48, min_words: int = 12) -> list[str]:
    """The docstrings of every module, class and function under ``packages``, split at blank lines into
    paragraphs (whitespace collapsed) and packed greedily into documents of at most ``max_words`` words
    (longer paragraphs cut); documents under ``min_words`` dropped, exact repeats kept once."""
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
                words = _words(paragraph)
                for start in range(0, len(words), max_words):
                    piece = words[start : start + max_words]
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


def domain_task(seed: int, heldout_per_target: int = 40, meta_per_target: int = 20) -> dict:
    """Splits of the domain-targeting task: ``{"train", "meta", "heldout"}`` -> rows with ``text``,
    ``source`` and ``target`` (bool: a target-domain source).

    Per target source ``heldout`` is drawn with a fixed seed, ``meta`` with ``seed``; ``train`` is every other
    document of every source, in a seeded order."""
    splits: dict[str, list[dict]] = {"train": [], "meta": [], "heldout": []}
    for source, packages in DOMAIN_SOURCES.items():
        docs = docstring_documents(packages)
        target = source in TARGET_SOURCES
        rows = [{"text": t, "source": source, "target": target} for t in docs]
        if target:
            random.Random(f"domain/heldout/{source}").shuffle(rows)
            splits["heldout"] += rows[:heldout_per_target]
            rest = rows[heldout_per_target:]
            random.Random(f"domain/{seed}/{source}").shuffle(rest)
            splits["meta"] += rest[:meta_per_target]
            rows = rest[meta_per_target:]
        splits["train"] += rows
    random.Random(f"domain/{seed}/order").shuffle(splits["train"])
    return splits
