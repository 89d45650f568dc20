"""The toy language-modelling data of the Trainer tests: counting sequences, every 4th one noisy."""

import torch

V, T = 64, 16  # vocabulary, sequence length


def rows(n: int, noisy: bool, seed: int) -> list[dict]:
    """n sequences (start + 0, 1, ... mod V); with ``noisy``, every 4th is random tokens from source 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = int(torch.randint(0, V, (1,), generator=g))
        ids = ((start + torch.arange(T)) % V).tolist()
        bad = bool(noisy) and i % 4 == 0
        if bad:
            ids = torch.randint(0, V, (T,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * T, "labels": ids, "id": i, "source": int(bad)})
    return out


def collate(items):
    return {k: torch.tensor([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels", "id", "source")}
