"""The default run's starting point: a small GPT-2 pre-trained briefly on other clean text shipped with Python.

Users fine-tune pretrained models, and only a model that has seen clean text can tell a corrupted document
from a clean one by more than its characters: trained from scratch for the default budget, a model ranks
shuffled-word documents at chance and the default run's baselines move with the data order by about as much as
weighting is worth (see the example's README). So the default run fine-tunes a model pre-trained here on the
standard library's docstrings (``stdlib_text.py``: about 5,800 documents and 185,000 words of English about
Python, none of it the corpus's ``pydoc_data`` text), with a byte-level BPE tokenizer trained on the same text
(``corpus.train_tokenizer``) and the corpus's model shape (``corpus.model_config``).

The result is cached: ``pretrain(cache_dir, seed)`` returns ``cache_dir/seed<seed>-<key>`` (the model and
tokenizer, for ``from_pretrained``, and ``pretrain_info.json``) and builds it only when absent; the key hashes
the settings, the texts, the Python, torch and transformers versions and the thread count (the CPU kernels
split sums by thread: 1 and 2 threads train other digits). The directory is written
under a temporary name and renamed when complete, so an interrupted build is never reused.

    python examples/llm_reweighting/pretrain.py --cache runs/pretrained --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import corpus
import stdlib_text

logger = logging.getLogger(__name__)
INFO = "pretrain_info.json"


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """How the starting model is pre-trained (AdamW, linear warmup over at most ``steps`` then cosine decay,
    gradient norm clipped at 1, documents of at most ``corpus.CorpusSettings.max_words`` words)."""

    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    vocab_size: int = 3000
    max_length: int = 128

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "vocab_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or self.warmup_steps < 0:
            raise ValueError(f"PretrainSettings: needs learning_rate > 0 and warmup_steps >= 0, got {self}")


def pretraining_texts() -> list[str]:
    """The pre-training documents, packed like the corpus's (``CorpusSettings``' word limits)."""
    return list(_pretraining_texts())


@functools.lru_cache(maxsize=1)
def _pretraining_texts() -> tuple[str, ...]:  # reading the standard library takes seconds: once per process
    settings = corpus.CorpusSettings()
    return tuple(stdlib_text.docstring_documents(None, max_words=settings.max_words, min_words=settings.min_words))


def _key(seed: int, settings: PretrainSettings, texts: list[str]) -> str:
    import torch
    import transformers

    # the thread count too: the CPU kernels split their sums by thread, so 1 and 2 threads train other digits
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    record = {"seed": seed, "settings": dataclasses.asdict(settings), "texts": stdlib_text.texts_hash(texts)}
    record.update(versions)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def pretrain(cache_dir: str | Path, seed: int = 0, **settings: Any) -> Path:
    """The directory of the model pre-trained with ``seed`` and ``settings`` (``PretrainSettings`` fields),
    built under ``cache_dir`` if it is not there yet."""
    config = PretrainSettings(**settings)
    texts = pretraining_texts()
    out = Path(cache_dir) / f"seed{seed}-{_key(seed, config, texts)}"
    if (out / INFO).is_file():
        return out
    start = time.perf_counter()
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer = corpus.train_tokenizer(texts, partial, config.vocab_size, config.max_length)
    model, losses = _train(texts, tokenizer, seed, config)
    model.save_pretrained(str(partial))
    info = {
        "seed": seed,
        "settings": dataclasses.asdict(config),
        "documents": len(texts),
        "texts_sha256": stdlib_text.texts_hash(texts),
        "python": sys.version.split()[0],
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": time.perf_counter() - start,
    }
    (partial / INFO).write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():  # a directory without its info: an earlier build that did not finish
        shutil.rmtree(out)
    os.replace(partial, out)
    logger.info(
        "pre-trained %s: %d steps on %d documents, loss %.3f -> %.3f, %.0f s",
        out,
        config.steps,
        len(texts),
        info["first_loss"],
        info["last_loss"],
        info["seconds"],
    )
    return out


def _train(texts: list[str], tokenizer, seed: int, config: PretrainSettings):
    """A plain loop (no Trainer: it runs in one process whatever launcher started the job)."""
    import torch
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [ids[: config.max_length - 1] + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(corpus.model_config(tokenizer, n_positions=config.max_length))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, config.steps), config.steps)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        rows, order = [encoded[i] for i in order[: config.batch_size]], order[config.batch_size :]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return model, losses


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, help="cache directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = pretrain(args.cache, args.seed, steps=args.steps)
    print(path)
    return path


if __name__ == "__main__":
    main()
