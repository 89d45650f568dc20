"""scalemlo.zero_init: a ZeRO-3 model built partitioned, in a fresh interpreter (the import trap included).

The two-rank runs (the same program built whole and partitioned, bit-identical)
are the zero_init cases of tests/test_distributed_zero.py.
"""

import os
import subprocess
import sys

import pytest
import torch

import scalemlo

PROGRAM = """
import os
os.environ["DS_ACCELERATOR"] = "cpu"
import sys
assert "torch._dynamo" not in sys.modules  # the trap: a first import of dynamo inside deepspeed.zero.Init
import scalemlo
config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "train_micro_batch_size_per_gpu": "auto"}
with scalemlo.zero_init(config) as partitioned:
    from transformers import GPT2Config, GPT2LMHeadModel  # imports torch._dynamo
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
params = list(model.parameters())
assert partitioned
assert all(p.numel() == 0 for p in params), "a whole parameter was allocated"
print("OK", sum(p.ds_numel for p in params))

# from_pretrained inside: the checkpoint lands in the partitions (Hugging Face sees the ZeRO-3 config)
import tempfile, deepspeed, torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
torch.manual_seed(1)
source = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
folder = tempfile.mkdtemp()
source.save_pretrained(folder)
with scalemlo.zero_init(config):
    loaded = GPT2LMHeadModel.from_pretrained(folder)
assert not is_deepspeed_zero3_enabled()  # only inside the context
for p, q in zip(loaded.parameters(), source.parameters()):
    assert p.numel() == 0
    with deepspeed.zero.GatheredParameters([p]):
        assert torch.equal(p.data, q.data)
print("LOADED")
"""


def test_hugging_face_models_are_built_and_loaded_partitioned_even_when_imported_inside():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK 28032" in proc.stdout  # (64 + 16) x 32 embeddings + 2 blocks of 12,704 + final norm 64 (head tied)
    assert "LOADED" in proc.stdout


def test_other_stages_build_whole():
    for config in (None, {"zero_optimization": {"stage": 2}}, scalemlo.LevelConfig()):
        with scalemlo.zero_init(config) as partitioned:
            layer = torch.nn.Linear(3, 2)
        assert not partitioned and layer.weight.numel() == 6


@pytest.mark.parametrize(
    "config, words",
    [({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"), (3, "takes a LevelConfig")],
)
def test_bad_configs_are_refused(config, words):
    with pytest.raises(ValueError, match=words):
        with scalemlo.zero_init(config):
            pass
