"""The two data sets of benchmarks/reweighting_quality.py, built offline from the standard library's own source.

Every text comes from the ``.py`` files of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), read with `ast` (nothing is imported
or executed). Packages Debian ships apart from ``libpython3.x-stdlib`` or that
newer Pythons removed (``tkinter``, ``idlelib``, ``turtledemo``, ``lib2to3``,
``distutils``, ``ensurepip``) and every test package are skipped, so any Debian
or python.org build of Python 3.10+ has the files. The texts change between
Python releases: results are comparable for one Python version (reported). The
reading is ``examples/llm_reweighting/stdlib_text.py``'s, shared with the main job's
pre-training text.

**Instruction tuning** (`instruction_task`). One example per public
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

**Domain targeting** (`domain_task`). The docstrings of all modules,
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
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "llm_reweighting"))
from stdlib_text import docstring_documents, stdlib_files  # noqa: E402  (shared with the main job's pre-training)
from stdlib_text import words as _words  # noqa: E402

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
            pairs.append(
                {
                    "module": module,
                    "name": name,
                    "prompt": f"What does `{signature}` do?",
                    "response": f"{signature}: {' '.join(words)}",
                    "doc": " ".join(words),
                }
            )
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
