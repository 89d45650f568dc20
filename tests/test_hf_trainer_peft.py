"""LoRA through peft: TRL's flags (``--use_peft --lora_r --lora_alpha --lora_dropout --lora_target_modules``) and
a ``peft_config`` argument; the model steps and the hypergradient flows through the adapter only.

The tiny GPT-2 of test_hf_trainer with a rank-4 LoRA on ``c_attn`` (peft's default for GPT-2). The base
weights are checked bit-identical after training and every hypergradient method the Trainer takes runs
(ZeRO-2 and resume: test_hf_trainer_peft_zero2_resume.py); the saved adapter reloads to the same logits.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml
from datasets import Dataset
from hf_toy import T, V, collate, rows
from test_hf_trainer import fresh_trainer_state  # noqa: F401 (fixture)
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser

from scalemlo.hf import ReweightingArguments, ReweightingTrainer, reset_trainer_state

peft = pytest.importorskip("peft")

LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8}
METHODS = ["finite_difference", "sama", "neumann", "cg", "penalty"]  # exact: small models only (a dense Hessian)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=V,
            n_positions=T,
            attn_implementation="eager",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def peft_trainer(tmp_path, model=None, peft_config=None, max_steps=4, deepspeed=None, **kwargs) -> ReweightingTrainer:
    config = {"save_strategy": "no", **LORA, **kwargs} if peft_config is None else {"save_strategy": "no", **kwargs}
    args = ReweightingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=max_steps,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        seed=0,
        meta_learning_rate=0.1,
        per_device_meta_batch_size=8,
        reweighting="source",
        logging_steps=1,
        disable_tqdm=True,
        deepspeed=deepspeed,
        **config,
    )
    return ReweightingTrainer(
        model=model or gpt2(),
        args=args,
        train_dataset=Dataset.from_list(rows(64, 16, 0)),
        meta_dataset=Dataset.from_list(rows(16, 0, 1)),
        data_collator=collate,
        reweighter_kwargs={"sources": ["clean", "noisy"]},
        peft_config=peft_config,
    )


def split(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base parameters, LoRA parameters) by name, copied."""
    named = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p for n, p in named.items() if "lora_" not in n}, {n: p for n, p in named.items() if "lora_" in n}


def hypergradient_norms(t: ReweightingTrainer) -> list[float]:
    return [h["meta/hypergrad_norm"] for h in t.state.log_history if "meta/hypergrad_norm" in h]


def final_vector(t: ReweightingTrainer) -> torch.Tensor:
    """The adapter's and the weighting model's parameters, one float64 vector."""
    _, lora = split(t.model)
    return torch.cat([p.detach().reshape(-1).double() for p in [*lora.values(), *t.reweighter.parameters()]])


@pytest.mark.parametrize("method", METHODS)
def test_only_the_adapter_trains_and_the_hypergradient_flows_through_it(tmp_path, method):
    t = peft_trainer(tmp_path, hypergradient_method=method)
    assert isinstance(t.model, peft.PeftModel)
    base_before, lora_before = split(t.model)
    t.train()
    base_after, lora_after = split(t.model)
    assert base_after.keys() == base_before.keys() and all(
        torch.equal(base_after[n], base_before[n]) for n in base_after
    )
    assert all(not torch.equal(lora_after[n], lora_before[n]) for n in lora_after)  # lora_B starts at 0
    # the model level (what every method perturbs and differentiates) is exactly the adapter's parameters
    names = {id(p): n for n, p in t.model.named_parameters()}
    assert sorted(names[id(p)] for p in t._model_level.params) == sorted(lora_after)
    assert all(p.grad is None for n, p in t.model.named_parameters() if "lora_" not in n)
    norms = hypergradient_norms(t)
    assert norms and all(math.isfinite(h) for h in norms)
    if method == "sama":
        # Adam's first step is lr * sign(g): no sensitivity to g, so sama's first hypergradient is 0 (any model)
        assert norms[0] == 0.0 and all(h > 0 for h in norms[1:])
    elif method == "cg":
        # cg stops at non-positive curvature keeping w = 0: along the meta gradient v, v.Hv < 0 here (LoRA's
        # Hessian is indefinite near lora_B = 0; autograd second-order products agree), so cg gives 0
        assert all(h == 0.0 for h in norms)
    elif method == "penalty":
        # alpha (df/dw(z) - df/dw(p)) with z - p = lr v / alpha, v the adapter's tiny meta gradient (~0.04):
        # the difference is a few float32 ulps, exactly 0 at some steps (penalty_alpha 100)
        assert any(h > 0 for h in norms)
    else:
        assert all(h > 0 for h in norms)


def test_the_saved_model_is_an_adapter_with_its_card(tmp_path):
    t = peft_trainer(tmp_path / "run", max_steps=2)
    t.model.get_base_model().config._name_or_path = "openai-community/gpt2"  # as from_pretrained sets it
    t.train()
    t.save_model(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    text = (saved / "README.md").read_text()  # peft's save writes its own card first: ours replaces it
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "openai-community/gpt2"
    assert {"scalemlo", "data-reweighting", "lora"} <= set(front["tags"]) and "## Adapter" in text
    # the adapter on a fresh copy of the base model gives the trained model's logits
    reloaded = peft.PeftModel.from_pretrained(gpt2(), str(saved)).eval()
    batch = collate(rows(4, 0, 3))
    t.model.eval()
    with torch.no_grad():
        expected = t.model(input_ids=batch["input_ids"]).logits
        assert torch.equal(reloaded(input_ids=batch["input_ids"]).logits, expected)


def test_a_peft_config_argument_wraps_the_model(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")
    t = peft_trainer(tmp_path, peft_config=config)
    assert isinstance(t.model, peft.PeftModel) and t.model.peft_config["default"].r == 2
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in t.model.named_parameters() if "lora_" in n}
    assert adapted == {"c_attn", "c_proj"}
    reset_trainer_state()
    with pytest.raises(ValueError, match="already is a PeftModel"):
        peft_trainer(tmp_path, model=t.model, peft_config=config)


def test_trl_flags_parse_and_need_peft(tmp_path, monkeypatch):
    parser = HfArgumentParser(ReweightingArguments)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none", "--use_peft"]
    (args,) = parser.parse_args_into_dataclasses(base + ["--lora_target_modules", "all-linear"])
    assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (16, 32, 0.05)  # TRL's defaults
    assert args.lora_target_modules == "all-linear"  # peft reads the shorthand as a string only
    (args,) = parser.parse_args_into_dataclasses(base + ["--lora_r", "8", "--lora_target_modules", "c_attn"])
    assert args.lora_r == 8 and args.lora_target_modules == ["c_attn"]  # a one-name list stays a list
    with pytest.raises(ValueError, match="--lora_dropout must be in"):
        ReweightingArguments(output_dir=str(tmp_path), use_cpu=True, use_peft=True, lora_dropout=1.0)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(ImportError, match="--use_peft needs the peft package: pip install peft"):
        ReweightingArguments(output_dir=str(tmp_path), use_cpu=True, use_peft=True)
