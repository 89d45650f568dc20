"""A small, noisy, multi-source language-modelling corpus built offline from text shipped with Python.

Text: the standard library's ``pydoc_data.topics.topics`` (the pages behind ``help("if")``, ~460 KB
of English), paragraphs repeated across topics kept once, packed into documents of at most
``max_words`` words, topics grouped by name into five sources (``SOURCE_TOPICS``). Per source,
``heldout`` is drawn with a fixed seed, ``validation`` and ``meta`` (equal counts per source) with
the run seed, the rest is ``train``. In ``corrupted_sources`` exactly ``round(corruption_rate * n)``
of the n train documents are replaced by one of the ``CORRUPTIONS``, kinds in turn. Outside those
sources and outside train everything is clean, and no text crosses splits. The defaults corrupt half of
three sources' train documents, 30 % of all of them; the near-duplicates are near-copies of a few documents
per source (``near_duplicate_originals``), redundant text that over-weights those few documents (dropping them
lowers the held-out loss, see the example's README), not one harmless copy each. Output in ``out_dir``:
``{train,meta,validation,heldout}.jsonl``, ``corpus_info.json`` and ``tokenizer/`` (byte-level BPE
trained on train, for ``AutoTokenizer.from_pretrained``); byte-identical for the same seed, settings
and Python version (the topics change between Python releases; their hash is in the info).

    python examples/llm_reweighting/corpus.py --out runs/corpus --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "meta", "validation", "heldout")
CORRUPTIONS = ("shuffled", "char_noise", "near_duplicate", "other_script")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Topic name -> source. Groups of related reference topics, sized to 8-12k words each after de-duplication.
SOURCE_TOPICS: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert",
        "assignment",
        "async",
        "augassign",
        "await",
        "break",
        "class",
        "compound",
        "continue",
        "del",
        "else",
        "for",
        "function",
        "global",
        "if",
        "import",
        "lambda",
        "nonlocal",
        "pass",
        "raise",
        "return",
        "try",
        "while",
        "with",
        "yield",
    ),
    "expressions": (
        "atom-identifiers",
        "atom-literals",
        "attribute-references",
        "binary",
        "bitwise",
        "booleans",
        "calls",
        "comparisons",
        "conversions",
        "exprlists",
        "floating",
        "id-classes",
        "identifiers",
        "imaginary",
        "in",
        "integers",
        "numbers",
        "operator-summary",
        "power",
        "shifting",
        "slicings",
        "strings",
        "subscriptions",
        "unary",
    ),
    "data_model": (
        "attribute-access",
        "callable-types",
        "context-managers",
        "customization",
        "dynamic-features",
        "exceptions",
        "execmodel",
        "naming",
        "numeric-types",
        "objects",
        "sequence-types",
        "specialattrs",
        "specialnames",
    ),
    "builtin_types": (
        "bltin-code-objects",
        "bltin-ellipsis-object",
        "bltin-null-object",
        "bltin-type-objects",
        "dict",
        "lists",
        "truth",
        "types",
        "typesfunctions",
        "typesmapping",
        "typesmethods",
        "typesmodules",
        "typesseq",
        "typesseq-mutable",
    ),
    "library": ("debugger", "formatstrings", "string-methods"),
}
FALLBACK_SOURCE = "statements"  # topics a later Python adds and the table above does not name

_LATIN_TO_CYRILLIC = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "абцдефгхийклмнопярстувшжызАБЦДЕФГХИЙКЛМНОПЯРСТУВШЖЫЗ",
)
_NOISE_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&*+-/<=>?@^_|~"
_UNDERLINE = re.compile(r"\s*[*=\-~^]{3,}\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=[A-Z\"(])")


@dataclasses.dataclass(frozen=True)
class CorpusSettings:
    """Everything that shapes the corpus besides the seed. Validated when built."""

    max_words: int = 48  # words per document (about 1.6 tokens per word, so 128 tokens are rarely exceeded)
    min_words: int = 12  # shorter leftovers are merged into the previous document or dropped
    heldout_per_source: int = 32  # fixed across seeds, so every seed reports on the same documents
    validation_per_source: int = 16
    meta_per_source: int = 20
    corrupted_sources: tuple[str, ...] = ("builtin_types", "library", "data_model")
    corruption_rate: float = 0.5  # exactly round(rate * n_train) documents per corrupted source (30 % of train)
    char_noise_rate: float = 0.7  # share of non-space characters replaced in a char_noise document
    near_duplicate_originals: int = 2  # per corrupted source: near-copies of this many documents (0: one each)
    vocab_size: int = 3000
    model_max_length: int = 128

    def __post_init__(self) -> None:
        checks = {
            "min_words": 1 <= self.min_words <= self.max_words,
            "heldout_per_source": self.heldout_per_source >= 1,
            "validation_per_source": self.validation_per_source >= 1,
            "meta_per_source": self.meta_per_source >= 1,
            "corrupted_sources": set(self.corrupted_sources) <= set(SOURCE_TOPICS),
            "corruption_rate": 0.0 <= self.corruption_rate < 1.0,
            "char_noise_rate": 0.0 < self.char_noise_rate <= 1.0,
            "near_duplicate_originals": self.near_duplicate_originals >= 0,
            "vocab_size": self.vocab_size >= 300,  # 256 bytes, 2 special tokens, some merges
            "model_max_length": self.model_max_length >= 8,
        }
        for name, ok in checks.items():
            if not ok:
                allowed = f"; allowed sources: {sorted(SOURCE_TOPICS)}" if name == "corrupted_sources" else ""
                raise ValueError(f"CorpusSettings.{name} = {getattr(self, name)!r} is out of range{allowed}")

    @classmethod
    def from_kwargs(cls, **settings: Any) -> CorpusSettings:
        """Settings from keyword arguments; an unknown key is a ``ValueError`` naming the allowed ones."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(f"unknown corpus settings {unknown}; allowed: {sorted(allowed)}")
        if "corrupted_sources" in settings:
            settings["corrupted_sources"] = tuple(settings["corrupted_sources"])
        return cls(**settings)


def source_of(topic: str) -> str:
    """The source a pydoc topic belongs to (``FALLBACK_SOURCE`` for topics the table does not name)."""
    return next((source for source, topics in SOURCE_TOPICS.items() if topic in topics), FALLBACK_SOURCE)


def topics_text() -> dict[str, str]:
    """The pydoc topics shipped with this Python (topic name -> reference text)."""
    from pydoc_data.topics import topics

    return dict(topics)


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks with title underlines removed and all whitespace collapsed to one space."""
    blocks = (" ".join(ln for ln in b.splitlines() if not _UNDERLINE.fullmatch(ln)) for b in re.split(r"\n\s*\n", text))
    return [" ".join(block.split()) for block in blocks if block.strip()]


def _units(paragraph: str, max_words: int) -> list[list[str]]:
    """A paragraph as word lists of at most ``max_words``: whole, else by sentences, else in equal pieces."""
    words = paragraph.split()
    if len(words) <= max_words:
        return [words]
    units = []
    for sentence in _SENTENCE_END.split(paragraph):
        sentence_words = sentence.split()
        pieces = -(-len(sentence_words) // max_words)
        size = -(-len(sentence_words) // pieces)
        units.extend(sentence_words[i : i + size] for i in range(0, len(sentence_words), size))
    return units


def clean_documents(settings: CorpusSettings | None = None) -> list[dict[str, Any]]:
    """Every clean document, independent of the seed, in topic order.

    Returns dicts with ``text`` (str), ``source``, ``topic`` and ``id`` (``"<topic>/<index>"``,
    stable for a given Python version and settings). Paragraphs are de-duplicated across topics
    (small topics first, so a paragraph stays with its most specific topic: ``if`` keeps its
    text, ``compound`` loses its copy), then greedily packed into documents of at most
    ``max_words`` words; a topic's last document under ``min_words`` joins the one before when
    both together stay under ``max_words + min_words``, else it is dropped.
    """
    settings = settings or CorpusSettings()
    topics = topics_text()
    seen: set[str] = set()
    kept: dict[str, list[str]] = {}
    for topic in sorted(topics, key=lambda t: (len(topics[t]), t)):
        kept[topic] = []
        for paragraph in _paragraphs(topics[topic]):
            key = paragraph.lower()
            if key not in seen:
                seen.add(key)
                kept[topic].append(paragraph)
    documents: list[dict[str, Any]] = []
    for topic in sorted(kept):
        packed: list[list[str]] = []
        for paragraph in kept[topic]:
            for unit in _units(paragraph, settings.max_words):
                if packed and len(packed[-1]) + len(unit) <= settings.max_words:
                    packed[-1].extend(unit)
                else:
                    packed.append(list(unit))
        if len(packed) > 1 and len(packed[-1]) < settings.min_words:
            if len(packed[-2]) + len(packed[-1]) <= settings.max_words + settings.min_words:
                packed[-2].extend(packed.pop())
        for idx, words in enumerate(words for words in packed if len(words) >= settings.min_words):
            documents.append(
                {"text": " ".join(words), "source": source_of(topic), "topic": topic, "id": f"{topic}/{idx:03d}"}
            )
    return documents


def shuffle_words(text: str, rng: random.Random) -> str:
    """The same words in a random order (a different order whenever the words allow one)."""
    words = text.split()
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != text:
            break
    return " ".join(words)


def char_noise(text: str, rng: random.Random, rate: float) -> str:
    """Each non-space character replaced, with probability ``rate``, by a random letter, digit or symbol."""
    return "".join(rng.choice(_NOISE_ALPHABET) if c != " " and rng.random() < rate else c for c in text)


def other_script(text: str) -> str:
    """Latin letters transliterated letter by letter into Cyrillic ones (a character map, no model)."""
    return text.translate(_LATIN_TO_CYRILLIC)


def near_duplicate(text: str, rng: random.Random) -> str:
    """A copy with small edits (one per 16 words, at most 3): a word dropped, repeated, or swapped with the next."""
    words = text.split()
    for _ in range(rng.randint(1, max(1, min(3, len(words) // 16)))):
        i = rng.randrange(len(words) - 1)
        edit = rng.choice(("drop", "repeat", "swap"))
        if edit == "drop":
            del words[i]
        elif edit == "repeat":
            words.insert(i, words[i])
        else:
            words[i], words[i + 1] = words[i + 1], words[i]
    edited = " ".join(words)
    return edited if edited != text else " ".join(words[:-1])


def _row(doc: dict[str, Any], text: str | None = None, corruption: str = "", duplicate_of: str = "") -> dict:
    return {
        "text": doc["text"] if text is None else text,
        "source": doc["source"],
        "id": doc["id"],
        "corrupted": bool(corruption),
        "corruption": corruption,
        "duplicate_of": duplicate_of,
    }


def split_documents(documents: list[dict[str, Any]], seed: int, settings: CorpusSettings) -> dict[str, list[dict]]:
    """Per source: heldout (fixed), validation and meta (seeded, balanced), train (the rest), then corruption.

    Returns split name -> rows (dicts as written to the JSON Lines files). ``train`` is in a
    seeded random order; the others go source by source (table order), by id within a source.
    """
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    need = settings.heldout_per_source + settings.validation_per_source + settings.meta_per_source
    for source in SOURCE_TOPICS:
        docs = sorted((d for d in documents if d["source"] == source), key=lambda d: d["id"])
        if len(docs) < need + 10:
            raise ValueError(f"source {source!r} has {len(docs)} documents; the held-out splits need {need} + 10")
        random.Random(f"heldout/{source}").shuffle(docs)
        heldout, rest = docs[: settings.heldout_per_source], docs[settings.heldout_per_source :]
        random.Random(f"{seed}/split/{source}").shuffle(rest)
        n_val = settings.validation_per_source
        validation, meta = rest[:n_val], rest[n_val : n_val + settings.meta_per_source]
        train = sorted(rest[n_val + settings.meta_per_source :], key=lambda d: d["id"])
        for name, part in (("heldout", heldout), ("validation", validation), ("meta", meta)):
            splits[name].extend(_row(d) for d in sorted(part, key=lambda d: d["id"]))
        if source in settings.corrupted_sources:
            splits["train"].extend(_corrupt(train, random.Random(f"{seed}/corrupt/{source}"), settings))
        else:
            splits["train"].extend(_row(d) for d in train)
    random.Random(f"{seed}/order").shuffle(splits["train"])
    return splits


def _corrupt(train: list[dict[str, Any]], rng: random.Random, settings: CorpusSettings) -> list[dict[str, Any]]:
    """Replace exactly ``round(rate * len(train))`` documents, kinds in turn (counts differ by at most one).

    Near-duplicates copy ``near_duplicate_originals`` clean documents of this source in turn (the
    originals stay in train, clean), or with 0 each copies its own clean document.
    """
    n_corrupt = round(settings.corruption_rate * len(train))
    chosen = sorted(rng.sample(range(len(train)), n_corrupt))
    kinds = [CORRUPTIONS[i % len(CORRUPTIONS)] for i in range(n_corrupt)]
    rng.shuffle(kinds)
    kind_of = dict(zip(chosen, kinds))
    clean = [d for i, d in enumerate(train) if i not in kind_of]
    n_originals = settings.near_duplicate_originals or kinds.count("near_duplicate")
    originals = rng.sample(clean, min(len(clean), n_originals))
    copies = 0
    rows = []
    for i, doc in enumerate(train):
        kind = kind_of.get(i, "")
        if kind == "near_duplicate" and settings.near_duplicate_originals:  # many near-copies of a few documents
            original = originals[copies % len(originals)]
            copies += 1
            rows.append(_row(doc, near_duplicate(original["text"], rng), kind, original["id"]))
        elif kind == "near_duplicate":  # the slot's own text is dropped; it repeats another train document
            original = originals.pop() if originals else rng.choice(clean)
            rows.append(_row(doc, near_duplicate(original["text"], rng), kind, original["id"]))
        elif kind == "shuffled":
            rows.append(_row(doc, shuffle_words(doc["text"], rng), kind))
        elif kind == "char_noise":
            rows.append(_row(doc, char_noise(doc["text"], rng, settings.char_noise_rate), kind))
        else:
            rows.append(_row(doc, other_script(doc["text"]), kind) if kind else _row(doc))
    return rows


def train_tokenizer(texts: list[str], out_dir: str | Path | None = None, vocab_size: int = 3000, max_length: int = 128):
    """A byte-level BPE trained on ``texts``, as a ``transformers.PreTrainedTokenizerFast``.

    ``eos_token`` (also bos and unk) is ``<|endoftext|>`` (id 0), ``pad_token`` is ``<|pad|>``
    (id 1), ``model_max_length`` is ``max_length``. Like GPT-2's, it adds no special tokens: append
    ``eos_token_id`` yourself (after truncating to ``max_length - 1``) if the model should learn
    where documents end. ``decode(encode(text)) == text`` for any text. With ``out_dir`` it is
    saved there for ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN], initial_alphabet=alphabet
    )
    trainer.show_progress = False
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    special = {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, model_max_length=max_length, clean_up_tokenization_spaces=False, **special
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def model_config(tokenizer, n_positions: int = 128, n_layer: int = 2, n_embd: int = 128, n_head: int = 4, **kwargs):
    """A small ``transformers.GPT2Config`` for ``tokenizer``'s vocabulary; ``kwargs`` go to ``GPT2Config``.

    Defaults: 2 layers, width 128, 4 heads, 128 positions, dropout off. With the default
    3000-token vocabulary (input and output embeddings tied) that is 0.80M parameters.
    """
    from transformers import GPT2Config

    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    kwargs = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **ids, **kwargs}
    sizes = {"n_positions": n_positions, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head}
    return GPT2Config(vocab_size=len(tokenizer), **sizes, **kwargs)


def _split_info(rows: list[dict[str, Any]], lengths: list[int], settings: CorpusSettings) -> dict[str, Any]:
    """Counts, corrupted shares and token lengths (``lengths``: tokens per row, untruncated) of one split."""
    lengths = sorted(lengths)
    by_source = {s: [r for r in rows if r["source"] == s] for s in SOURCE_TOPICS}
    in_corrupted = [r for r in rows if r["source"] in settings.corrupted_sources]
    return {
        "documents": len(rows),
        "corrupted": sum(r["corrupted"] for r in rows),
        "corrupted_share": sum(r["corrupted"] for r in rows) / len(rows),
        "corrupted_share_in_corrupted_sources": sum(r["corrupted"] for r in in_corrupted) / max(1, len(in_corrupted)),
        "per_corruption": {kind: sum(r["corruption"] == kind for r in rows) for kind in CORRUPTIONS},
        "per_source": {
            s: {"documents": len(v), "corrupted": sum(r["corrupted"] for r in v)} for s, v in by_source.items()
        },
        "tokens": {
            "total": sum(lengths),
            "mean": round(sum(lengths) / len(lengths), 2),
            "median": lengths[len(lengths) // 2],
            "p95": lengths[int(0.95 * (len(lengths) - 1))],
            "max": lengths[-1],
            f"over_{settings.model_max_length}": sum(n > settings.model_max_length for n in lengths),
        },
    }


def _topics_hash() -> str:
    return hashlib.sha256(json.dumps(topics_text(), sort_keys=True).encode("utf-8")).hexdigest()


def is_built(out_dir: str | Path, seed: int = 0, **settings: Any) -> bool:
    """Whether ``out_dir`` holds the corpus ``build_corpus(out_dir, seed, **settings)`` would write (its
    info names the same seed, settings, Python version and pydoc topics), so it can be reused."""
    path = Path(out_dir) / "corpus_info.json"
    if not path.is_file():
        return False
    info = json.loads(path.read_text(encoding="utf-8"))
    expected = {
        "seed": seed,
        "settings": json.loads(json.dumps(dataclasses.asdict(CorpusSettings.from_kwargs(**settings)))),
        "python": ".".join(map(str, sys.version_info[:3])),
        "pydoc_topics_sha256": _topics_hash(),
    }
    return all(info.get(k) == v for k, v in expected.items())


def build_corpus(out_dir: str | Path, seed: int = 0, **settings: Any) -> dict[str, Any]:
    """Write the four splits, ``tokenizer/`` and ``corpus_info.json`` to ``out_dir``; return the info.

    ``settings`` are ``CorpusSettings`` fields (an unknown name is a ``ValueError``). The same seed
    and settings give byte-identical files on the same Python and library versions.
    """
    config = CorpusSettings.from_kwargs(**settings)
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = split_documents(clean_documents(config), seed, config)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    texts = [row["text"] for row in splits["train"]]
    tokenizer = train_tokenizer(texts, out / "tokenizer", config.vocab_size, config.model_max_length)
    info: dict[str, Any] = {
        "seed": seed,
        "settings": dataclasses.asdict(config),
        "python": ".".join(map(str, sys.version_info[:3])),
        "pydoc_topics_sha256": _topics_hash(),
        "sources": {source: list(names) for source, names in SOURCE_TOPICS.items()},
        "vocab_size": len(tokenizer),
        "splits": {},
    }
    for name, rows in splits.items():
        encodings = tokenizer.backend_tokenizer.encode_batch([row["text"] for row in rows])
        info["splits"][name] = _split_info(rows, [len(e.ids) for e in encodings], config)
    with open(out / "corpus_info.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
    counts = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
    logger.info("corpus in %s: %s documents, built in %.1f s", out, counts, time.perf_counter() - start)
    return info


def load_split(out_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """The rows of one split (``train``, ``meta``, ``validation`` or ``heldout``) written by ``build_corpus``."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; allowed: {list(SPLITS)}")
    path = Path(out_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build it with: python {__file__} --out {out_dir}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: ``python corpus.py --out DIR [--seed S] [--corruption-rate R] [--corrupted-sources ...] ...``."""
    defaults = CorpusSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the splits, tokenizer/ and corpus_info.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corruption-rate", type=float, default=defaults.corruption_rate)
    parser.add_argument("--corrupted-sources", nargs="+", default=list(defaults.corrupted_sources))
    parser.add_argument("--char-noise-rate", type=float, default=defaults.char_noise_rate)
    parser.add_argument("--near-duplicate-originals", type=int, default=defaults.near_duplicate_originals)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = {
        "corruption_rate": args.corruption_rate,
        "corrupted_sources": args.corrupted_sources,
        "char_noise_rate": args.char_noise_rate,
        "near_duplicate_originals": args.near_duplicate_originals,
    }
    info = build_corpus(args.out, seed=args.seed, **settings)
    for name, split in info["splits"].items():
        share, tokens = 100 * split["corrupted_share"], split["tokens"]
        line = f"{name:10} {split['documents']:5d} documents, {split['corrupted']:4d} corrupted ({share:.1f} %)"
        logger.info("%s, tokens mean %.0f, p95 %d, max %d", line, tokens["mean"], tokens["p95"], tokens["max"])
    return info


if __name__ == "__main__":
    main()
