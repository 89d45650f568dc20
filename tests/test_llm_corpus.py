"""examples/llm_reweighting/corpus.py: the offline, multi-source, partly corrupted LM corpus and its tokenizer."""

import collections
import difflib
import math
from pathlib import Path

import examples_helper
import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "examples" / "llm_reweighting" / "corpus.py"


def load_corpus_module():
    return examples_helper.load_file(PATH, "llm_reweighting_corpus")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus_module()


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """Seed 0 built twice (library call and command line) and seed 1 once."""
    root = tmp_path_factory.mktemp("llm_corpus")
    info = corpus.build_corpus(root / "a", seed=0)
    corpus.main(["--out", str(root / "b"), "--seed", "0"])
    corpus.build_corpus(root / "seed1", seed=1)
    splits = {name: corpus.load_split(root / "a", name) for name in corpus.SPLITS}
    return {"root": root, "dir": root / "a", "info": info, "splits": splits}


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _word_ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()


def test_same_seed_same_bytes_other_seed_same_heldout(built):
    a, b, other = (_files(built["root"] / name) for name in ("a", "b", "seed1"))
    assert set(a) >= {"train.jsonl", "meta.jsonl", "validation.jsonl", "heldout.jsonl", "corpus_info.json"}
    assert any(name.startswith("tokenizer") for name in a)
    assert a == b
    assert other["heldout.jsonl"] == a["heldout.jsonl"]
    assert other["train.jsonl"] != a["train.jsonl"] and other["meta.jsonl"] != a["meta.jsonl"]


def test_a_built_corpus_is_reused_only_for_its_own_seed_and_settings(corpus, built):
    """The default run rebuilds <output_dir>/corpus unless it is exactly the one it would build (a
    directory left by another seed or an older corpus design must not be trained on silently)."""
    assert corpus.is_built(built["dir"], seed=0) and corpus.is_built(built["root"] / "seed1", seed=1)
    assert not corpus.is_built(built["dir"], seed=1)
    assert not corpus.is_built(built["dir"], seed=0, corruption_rate=0.2)
    assert not corpus.is_built(built["root"] / "missing", seed=0)


def test_the_default_run_reads_its_output_dir_and_corpus_seed_in_either_flag_form():
    script = examples_helper.load_file(PATH.parent / "run_reweighting.py", "llm_run_reweighting_flags")
    argv = ["--output_dir", "runs/x", "--seed", "1", "--corpus_seed=2"]
    assert script.flag_value(argv, "output_dir", "d") == "runs/x" and script.flag_value(argv, "corpus_seed", 0) == "2"
    assert script.flag_value(["--corpus_seed", "3"], "corpus_seed", 0) == "3"
    assert script.flag_value([], "corpus_seed", 0) == 0


def test_splits_are_disjoint_and_cover_every_document_once(corpus, built):
    splits = built["splits"]
    ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(doc["id"] for doc in corpus.clean_documents())
    texts = {name: {row["text"] for row in rows} for name, rows in splits.items()}
    for i, first in enumerate(corpus.SPLITS):
        for second in corpus.SPLITS[i + 1 :]:
            assert not texts[first] & texts[second], (first, second)
    # a near-duplicate copies a clean train document of its own source, never a document of another split
    train = {row["id"]: row for row in splits["train"]}
    for row in splits["train"]:
        if row["corruption"] == "near_duplicate":
            original = train[row["duplicate_of"]]
            assert not original["corrupted"] and original["source"] == row["source"]
        else:
            assert row["duplicate_of"] == ""
    # no held-out, validation or meta document is a near-copy of any train text (word 5-gram index, then diff)
    shingles = lambda text: {tuple(text.lower().split()[i : i + 5]) for i in range(len(text.split()) - 4)}
    index = collections.defaultdict(set)
    for row in splits["train"]:
        for shingle in shingles(row["text"]):
            index[shingle].add(row["text"])
    worst = 0.0
    for name in ("meta", "validation", "heldout"):
        for row in splits[name]:
            candidates = set().union(*(index[s] for s in shingles(row["text"])))
            worst = max([worst] + [_word_ratio(row["text"], other) for other in candidates])
    assert worst < 0.85  # parallel wording (e.g. a class's vs a function's docstring rule) reaches 0.80


def test_corrupted_share_only_in_corrupted_sources_of_train(corpus, built):
    settings, info = corpus.CorpusSettings(), built["info"]
    assert settings.corruption_rate == 0.5 and len(settings.corrupted_sources) == 3
    train = built["splits"]["train"]
    in_corrupted = 0
    for source in corpus.SOURCE_TOPICS:
        rows = [row for row in train if row["source"] == source]
        n_bad = sum(row["corrupted"] for row in rows)
        if source in settings.corrupted_sources:
            assert n_bad == round(settings.corruption_rate * len(rows))
            kinds = collections.Counter(row["corruption"] for row in rows if row["corrupted"])
            assert set(kinds) == set(corpus.CORRUPTIONS) and max(kinds.values()) - min(kinds.values()) <= 1
            in_corrupted += len(rows)
        else:
            assert n_bad == 0
        assert info["splits"]["train"]["per_source"][source] == {"documents": len(rows), "corrupted": n_bad}
    share = sum(row["corrupted"] for row in train) / in_corrupted
    assert abs(share - settings.corruption_rate) < 0.005
    assert abs(info["splits"]["train"]["corrupted_share"] - 0.3) < 0.02  # about 30 % of all train documents
    assert info["splits"]["train"]["corrupted_share_in_corrupted_sources"] == pytest.approx(share)
    for row in train:
        assert row["corrupted"] == (row["corruption"] != "") and row["corruption"] in ("", *corpus.CORRUPTIONS)
    for name in ("meta", "validation", "heldout"):
        assert not any(row["corrupted"] or row["corruption"] for row in built["splits"][name])
        counts = collections.Counter(row["source"] for row in built["splits"][name])
        assert len(set(counts.values())) == 1 and set(counts) == set(corpus.SOURCE_TOPICS)  # balanced


def test_every_corruption_really_corrupts(corpus, built):
    originals = {doc["id"]: doc["text"] for doc in corpus.clean_documents()}
    seen = collections.Counter()
    for row in built["splits"]["train"]:
        text, kind = row["text"], row["corruption"]
        original = originals[row["duplicate_of"] or row["id"]]
        seen[kind] += 1
        if kind == "":
            assert text == original
            continue
        assert text != original
        if kind == "shuffled":
            assert sorted(text.split()) == sorted(original.split())
        elif kind == "char_noise":
            assert len(text) == len(original)
            changed = [a != b for a, b in zip(text, original) if b != " "]
            assert abs(sum(changed) / len(changed) - corpus.CorpusSettings().char_noise_rate) < 0.25
        elif kind == "other_script":
            letters = [c for c in text if c.isalpha()]
            assert sum("\u0400" <= c <= "\u04ff" for c in letters) / len(letters) > 0.9
        elif kind == "near_duplicate":
            assert _word_ratio(text, original) > 0.88
    assert all(seen[kind] >= 10 for kind in corpus.CORRUPTIONS)


def test_near_duplicates_copy_a_few_documents_per_source(corpus, built, tmp_path):
    settings = corpus.CorpusSettings()
    for source in settings.corrupted_sources:
        copies = collections.Counter(
            row["duplicate_of"]
            for row in built["splits"]["train"]
            if row["source"] == source and row["corruption"] == "near_duplicate"
        )
        assert len(copies) == settings.near_duplicate_originals and min(copies.values()) >= 5
    # near_duplicate_originals=0: one copy of a different document each
    splits = corpus.split_documents(corpus.clean_documents(), 0, corpus.CorpusSettings(near_duplicate_originals=0))
    originals = [row["duplicate_of"] for row in splits["train"] if row["corruption"] == "near_duplicate"]
    assert len(originals) == len(set(originals)) >= 10
    with pytest.raises(ValueError, match="near_duplicate_originals"):
        corpus.CorpusSettings(near_duplicate_originals=-1)


def test_count_model_scores_noise_lower_than_clean_text(corpus, built):
    """A bigram model of clean train text (an independent oracle) finds noisy documents unlikely."""
    splits = built["splits"]
    unigram, bigram = collections.Counter(), collections.Counter()
    for row in splits["train"]:
        if not row["corrupted"]:
            words = ["<s>"] + row["text"].split()
            unigram.update(words)
            bigram.update(zip(words, words[1:]))
    total, vocab = sum(unigram.values()), len(unigram) + 1

    def mean_log_likelihood(text):
        words = ["<s>"] + text.split()
        logp = [
            math.log(0.7 * bigram[(a, b)] / max(1, unigram[a]) + 0.3 * (unigram[b] + 1) / (total + vocab))
            for a, b in zip(words, words[1:])
        ]
        return sum(logp) / len(logp)

    heldout = [mean_log_likelihood(row["text"]) for row in splits["heldout"]]
    for kind in ("shuffled", "char_noise", "other_script"):
        noisy = [mean_log_likelihood(row["text"]) for row in splits["train"] if row["corruption"] == kind]
        auc = sum((n < h) + 0.5 * (n == h) for n in noisy for h in heldout) / (len(noisy) * len(heldout))
        assert auc > 0.8, kind
    # near-duplicates are redundant, not noisy: they look *more* likely than unseen clean text
    duplicates = [mean_log_likelihood(row["text"]) for row in splits["train"] if row["corruption"] == "near_duplicate"]
    assert sum(duplicates) / len(duplicates) > sum(heldout) / len(heldout)


def test_tokenizer_loads_offline_and_round_trips(corpus, built, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(built["dir"] / "tokenizer"), local_files_only=True)
    assert tokenizer.eos_token == corpus.EOS_TOKEN and tokenizer.pad_token == corpus.PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.model_max_length == 128
    assert len(tokenizer) == corpus.CorpusSettings().vocab_size == built["info"]["vocab_size"]
    for row in built["splits"]["heldout"][:50] + [{"text": "Ünïcödé, tabs\tand  spaces: ∑ λ → 🐍"}]:
        ids = tokenizer(row["text"])["input_ids"]
        assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids
        assert tokenizer.decode(ids) == row["text"]
    tokens = built["info"]["splits"]["heldout"]["tokens"]
    assert 30 < tokens["mean"] < 100 and tokens["p95"] <= 128


def test_model_from_config_starts_at_log_vocab_loss_and_trains(corpus, built):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(built["dir"] / "tokenizer"))
    config = corpus.model_config(tokenizer)
    assert (config.vocab_size, config.n_positions, config.n_layer, config.n_embd) == (len(tokenizer), 128, 2, 128)
    assert config.pad_token_id == tokenizer.pad_token_id and config.eos_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    assert 0.7e6 < sum(p.numel() for p in model.parameters()) < 0.9e6
    texts = [row["text"] for row in built["splits"]["train"][:8]]
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 128
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    # GPT-2's init (std 0.02) gives near-uniform predictions: the loss starts at log(vocab size)
    assert out.loss.item() == pytest.approx(math.log(len(tokenizer)), abs=0.1)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_settings_and_splits_are_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="allowed"):
        corpus.build_corpus(tmp_path, seed=0, max_word=10)
    with pytest.raises(ValueError, match="corrupted_sources"):
        corpus.CorpusSettings.from_kwargs(corrupted_sources=["forum"])
    with pytest.raises(ValueError, match="corruption_rate"):
        corpus.CorpusSettings(corruption_rate=1.5)
    with pytest.raises(ValueError, match="allowed"):
        corpus.load_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="--out"):
        corpus.load_split(tmp_path, "train")
