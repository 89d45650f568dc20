"""ReweightingTrainer takes a user's data as it comes: no id column, string sources, text columns, padding.

The user-shaped sets: texts tokenized by a word-level tokenizer (built here, no download) and batched by
``DataCollatorForLanguageModeling(mlm=False)`` (padding, labels -100 on it), a ``text`` and a string
``source`` column kept beside the tokens, no ``id`` column, no ``reweighter_kwargs``; the meta set with other
columns (``content``, ``url``). Before, the string column failed in the collator ("Unable to create tensor
... excessive nesting"), and each scheme needed ``id``, integer sources and its ``reweighter_kwargs``. Each
run is compared with the same data plumbed by hand the old way (integer ``id`` and ``source`` columns, the
text dropped, the scheme's arguments given): the model and the weighting model end bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_hf_trainer import fresh_trainer_state  # noqa: F401 (fixture)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from scalemlo.hf import ReweightingArguments, ReweightingTrainer

V = 40
SOURCES = ["web", "books", "forum"]  # not sorted: the Trainer indexes them sorted (books 0, forum 1, web 2)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]")


def texts(n: int, seed: int) -> list[str]:
    """Counting sequences of 5-12 words; every third one shuffled (the noisy ones)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 13, (1,), generator=g))
        start = int(torch.randint(0, V - 2, (1,), generator=g))
        words = [(start + k) % (V - 2) for k in range(length)]
        if i % 3 == 0:
            words = [words[k] for k in torch.randperm(length, generator=g).tolist()]
        out.append(" ".join(f"w{w}" for w in words))
    return out


def user_sets(tok):
    """The training set as a user has it (text, string source, tokens; no id) and a meta set with other columns."""
    train_texts = texts(24, 0)
    train = Dataset.from_dict({"text": train_texts, "source": [SOURCES[i % 3] for i in range(24)]})
    train = train.map(lambda row: tok(row["text"]))  # keeps text and source, as datasets.map does
    meta_texts = texts(8, 1)
    meta = Dataset.from_dict({"content": meta_texts, "url": [f"https://example.org/{i}" for i in range(8)]})
    meta = meta.map(lambda row: tok(row["content"]))
    return train, meta


def hand_plumbed_sets(train, meta):
    """The same rows the old way: integer id and source (sorted names), the text columns dropped."""
    names = sorted(SOURCES)
    plain = train.remove_columns(["text", "source"])
    plain = plain.add_column("id", list(range(len(train)))).add_column(
        "source", [names.index(s) for s in train["source"]]
    )
    return plain, meta.remove_columns(["content", "url"])


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


def arguments(tmp_path, reweighting: str, **kwargs) -> ReweightingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_meta_batch_size=4,
        max_steps=3,
        learning_rate=5e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        reweighting=reweighting,
        meta_learning_rate=0.1,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(kwargs)
    return ReweightingArguments(**settings)


def state(t: ReweightingTrainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in [*t.model.parameters(), *t.reweighter.parameters()]])


HAND_KWARGS = {"source": {"sources": sorted(SOURCES)}, "example": {"n_examples": 24}, "meta_weight_net": {}}


@pytest.mark.parametrize("reweighting", ["source", "example", "meta_weight_net"])
def test_user_shaped_data_trains_as_the_hand_plumbed_data(tmp_path, reweighting):
    tok = tokenizer()
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    train, meta = user_sets(tok)
    t = ReweightingTrainer(
        model=model(),
        args=arguments(tmp_path / "user", reweighting),
        train_dataset=train,
        meta_dataset=meta,
        data_collator=collator,
    )
    prepared = t.train_dataset
    assert sorted(prepared.column_names) == ["attention_mask", "id", "input_ids", "source"]
    assert prepared["id"] == list(range(24))
    # the indices name the rows' own sources
    assert [t._source_names[i] for i in prepared["source"]] == train["source"]
    assert t._source_names == sorted(SOURCES)
    if reweighting == "source":
        assert t.reweighter.names == sorted(SOURCES)
    if reweighting == "example":
        assert t.reweighter.logits.numel() == len(train)
    assert sorted(t.meta_dataset.column_names) == ["attention_mask", "input_ids"]
    t.train()
    assert t._meta_level.steps == 2  # shared forward: the meta steps due after steps 1 and 2

    plain_train, plain_meta = hand_plumbed_sets(train, meta)
    by_hand = ReweightingTrainer(
        model=model(),
        args=arguments(tmp_path / "hand", reweighting),
        train_dataset=plain_train,
        meta_dataset=plain_meta,
        data_collator=collator,
        reweighter_kwargs=HAND_KWARGS[reweighting],
    )
    by_hand.train()
    assert torch.equal(state(t), state(by_hand))
    logged = [h for h in t.state.log_history if "weight/source/web" in h]
    assert logged and all(k in logged[0] for k in ("weight/source/books", "weight/source/forum"))


def test_the_hand_plumbed_way_is_kept_as_it_was(tmp_path):
    """Integer id and source columns, example_names, source_names and explicit reweighter_kwargs: the
    training set is used as given (the same object) and the names are the user's."""
    tok = tokenizer()
    train, meta = hand_plumbed_sets(*user_sets(tok))
    names = [f"doc-{i}" for i in range(24)]
    t = ReweightingTrainer(
        model=model(),
        args=arguments(tmp_path, "source"),
        train_dataset=train,
        meta_dataset=meta,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        example_names=names,
        source_names=["b", "f", "w"],
        reweighter_kwargs={"sources": 3},
    )
    assert t.train_dataset is train and t.meta_dataset is meta
    assert t._source_names == ["b", "f", "w"] and t.weight_table.example_names == names


def test_string_ids_become_the_example_names(tmp_path):
    tok = tokenizer()
    train, meta = user_sets(tok)
    train = train.add_column("id", [f"doc-{i}" for i in range(24)])
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    t = ReweightingTrainer(
        model=model(),
        args=arguments(tmp_path, "example"),
        train_dataset=train,
        meta_dataset=meta,
        data_collator=collator,
    )
    assert t.train_dataset["id"] == list(range(24))
    assert t.weight_table.example_names == [f"doc-{i}" for i in range(24)]


class Stepped(Exception):
    pass


@pytest.mark.parametrize(
    "case, words",
    [
        ("meta_not_tokenized", r"meta_dataset has no input_ids column \(its columns are \['content'\]\); tokenize it"),
        (
            "meta_ragged_column",
            r"meta_dataset: the data collator cannot batch .*columns are \['content', 'url', .*, 'tags'\]",
        ),
        ("train_no_source", r"--reweighting source .*lacks \(columns: \['text', 'input_ids', 'attention_mask'\]\)"),
        ("unknown_source", r"'source' column holds \['web'\], which the reweighting does not know"),
        ("ids_out_of_range", r"'id' column runs from 100 to 123, but --reweighting example learns 24 weights"),
        ("source_missing", r"'source' column has no value in 2 of 24 rows \(first: rows \[3, 5\]\); give every row"),
    ],
)
def test_bad_data_fails_at_construction_naming_the_columns(tmp_path, case, words):
    """Each refused when the Trainer is built, before any step (the meta set's problem is not found only at
    the first meta step, after meta_warmup_steps)."""
    tok = tokenizer()
    train, meta = user_sets(tok)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    reweighting, kwargs = "source", {}
    if case == "meta_not_tokenized":
        meta = Dataset.from_dict({"content": texts(8, 1)})
    elif case == "meta_ragged_column":  # a column of lists of different lengths: no tensor can hold it
        meta = meta.add_column("tags", [list(range(i % 3 + 1)) for i in range(len(meta))])
    elif case == "train_no_source":
        train = train.remove_columns("source")
    elif case == "unknown_source":
        kwargs = {"reweighter_kwargs": {"sources": ["books", "forum"]}}
    elif case == "source_missing":  # a scheme that never reads sources still gets the weights' statistics by source
        reweighting = "meta_weight_net"
        train = train.map(lambda row, i: {"source": None if i in (3, 5) else row["source"]}, with_indices=True)
    elif case == "ids_out_of_range":
        reweighting = "example"
        train = train.add_column("id", list(range(100, 124)))
    m = model()
    m.register_forward_hook(lambda *_: (_ for _ in ()).throw(Stepped()))
    with pytest.raises(ValueError, match=words):
        ReweightingTrainer(
            model=m,
            args=arguments(tmp_path, reweighting, meta_warmup_steps=2),
            train_dataset=train,
            meta_dataset=meta,
            data_collator=collator,
            **kwargs,
        )


def test_the_construction_check_leaves_the_random_state_alone(tmp_path):
    """The check collates a batch of each set; a collator that draws (a masking one) must not move the
    run's random numbers: after construction they are those of a collator that draws nothing."""
    import random

    import numpy

    tok = tokenizer()
    train, meta = user_sets(tok)
    plain = DataCollatorForLanguageModeling(tok, mlm=False)

    def drawing(rows):
        torch.rand(3), random.random(), numpy.random.rand()
        return plain(rows)

    after = []
    for collator in (plain, drawing):
        ReweightingTrainer(
            model=model(),
            args=arguments(tmp_path, "source"),
            train_dataset=train,
            meta_dataset=meta,
            data_collator=collator,
        )
        after.append((torch.rand(2).tolist(), random.random(), float(numpy.random.rand())))
    assert after[0] == after[1]
