"""The default run's pre-trained start (examples/llm_reweighting/pretrain.py): built once, reused, never half."""

import json
import sys

import examples_helper
import pytest

HERE = examples_helper.EXAMPLES / "llm_reweighting"


@pytest.fixture(scope="module")
def pretrain():
    sys.path.insert(0, str(HERE))
    return examples_helper.load_file(HERE / "pretrain.py", "pretrain")


def test_the_text_is_the_standard_librarys_docstrings_not_the_corpus(pretrain):
    import corpus

    texts = pretrain.pretraining_texts()
    assert len(texts) > 1000 and all(12 <= len(t.split()) <= 48 for t in texts)
    assert len(set(texts)) == len(texts)
    corpus_texts = {d["text"] for d in corpus.clean_documents()}
    assert not corpus_texts & set(texts)  # none of the corpus's documents is pre-trained on


def test_built_once_reused_and_keyed_by_seed_and_settings(pretrain, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = pretrain.pretrain(tmp_path, seed=0, steps=3, batch_size=4)
    info = json.loads((first / pretrain.INFO).read_text())
    assert info["settings"]["steps"] == 3 and info["seed"] == 0
    model = AutoModelForCausalLM.from_pretrained(str(first))
    tokenizer = AutoTokenizer.from_pretrained(str(first))
    assert model.config.vocab_size == len(tokenizer)
    calls = []
    monkeypatch.setattr(pretrain, "_train", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    assert pretrain.pretrain(tmp_path, seed=0, steps=3, batch_size=4) == first and not calls  # reused
    monkeypatch.undo()
    other_seed = pretrain.pretrain(tmp_path, seed=1, steps=3, batch_size=4)
    other_steps = pretrain.pretrain(tmp_path, seed=0, steps=2, batch_size=4)
    assert len({first, other_seed, other_steps}) == 3
    again = AutoModelForCausalLM.from_pretrained(str(other_seed))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not list(tmp_path.glob("*.partial-*"))


def test_an_interrupted_build_is_not_reused(pretrain, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(tmp_path, seed=0, steps=2, batch_size=4)
    monkeypatch.undo()
    path = pretrain.pretrain(tmp_path, seed=0, steps=2, batch_size=4)  # built now, not the half directory
    assert (path / pretrain.INFO).is_file() and (path / "config.json").is_file()


@pytest.mark.parametrize("bad", [{"steps": 0}, {"learning_rate": 0.0}, {"warmup_steps": -1}])
def test_bad_settings_are_refused(pretrain, tmp_path, bad):
    with pytest.raises(ValueError, match="PretrainSettings"):
        pretrain.pretrain(tmp_path, **bad)
