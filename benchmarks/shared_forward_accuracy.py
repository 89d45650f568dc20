"""The shared-forward estimator against a float64 reference: model size x dtype x difference x radius.

    python benchmarks/shared_forward_accuracy.py            # ~3 min; writes results/shared_forward_accuracy.json

Task: a GPT-2 config (random init, random tokens, no dropout) under a
Meta-Weight-Net, the model declared reweighted (``per_example_losses``,
``example_weights``) and the weight net using ``LevelConfig.shared_forward``
with ``finite_difference`` (w = lr v). Reference: the detach-aware mixed
product of the training dynamics in float64 by double backward,
-(d/dλ) mean_i m_λ(s_i) (∇ℓ_i · w) with s_i = ℓ_i(θ) held. Reported: the
relative error ||g - ref|| / ||ref|| and the cosine, for the one-sided
difference (7 units) at its default radius and a sweep, and for the central
one (8 units) at ``fd_radius`` 1e-2.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VOCAB, LR = 97, 0.05
SIZES = [(2, 32), (4, 64), (4, 128), (6, 256), (4, 384), (6, 768)]  # (layers, width)
SWEEP = [1e-2, 1e-3, 1e-4, 1e-5]


def gpt2(layers: int, width: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "eager"  # CPU SDPA has no double backward (the reference needs one)
    return GPT2LMHeadModel(cfg).to(dtype)


def weight_net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)


def per_example(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    losses = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return losses.view(len(ids), -1).mean(1)


def weights_of(net, losses):
    return 2 * torch.sigmoid(net(losses.unsqueeze(1)).squeeze(1))


def batches():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (8, 24), generator=g), torch.randint(0, VOCAB, (6, 24), generator=g)


def reference(layers: int, width: int) -> torch.Tensor:
    lm, net = gpt2(layers, width, torch.float64), weight_net(torch.float64)
    train, meta = batches()
    params = list(lm.parameters())
    w = [LR * g for g in torch.autograd.grad(per_example(lm, meta).mean(), params)]
    losses = per_example(lm, train)
    z = torch.ones_like(losses, requires_grad=True)
    grads = torch.autograd.grad((z * losses).sum(), params, create_graph=True)
    (slopes,) = torch.autograd.grad(sum((g * wi).sum() for g, wi in zip(grads, w)), z)
    out = torch.autograd.grad(-(weights_of(net, losses.detach()) * slopes).mean(), list(net.parameters()))
    return torch.cat([o.flatten() for o in out])


def estimate(layers: int, width: int, dtype: torch.dtype, **config) -> torch.Tensor:
    from scalemlo import Engine, EngineConfig, Level, LevelConfig
    from scalemlo.hypergrad.shared_forward import SharedForward

    class Model(Level):
        def per_example_losses(self, batch):
            return per_example(self.module, batch)

        def example_weights(self, batch, losses):
            return weights_of(self.uppers["meta"].module, losses)

    class Meta(Level):
        def training_step(self, batch):
            return per_example(self.lowers["model"].module, batch).mean()

    lm, net = gpt2(layers, width, dtype), weight_net(dtype)
    train, meta = batches()
    model = Model("model", lm, lambda p: torch.optim.SGD(p, lr=LR), [train], config=LevelConfig(backend="torch"))
    upper = Meta(
        "meta",
        net,
        lambda p: torch.optim.SGD(p, lr=0.1),
        [meta],
        config=LevelConfig(backend="torch", shared_forward=True, **config),
    )
    engine = Engine([model, upper], {"meta": ["model"]}, EngineConfig(max_steps=0, progress_bar=False))
    grads = engine.coordinator.hypergradient("meta", meta, shared=SharedForward(model, train))
    return torch.cat([g.flatten() for g in grads]).double()


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"rel_err": float((got - ref).norm() / ref.norm()), "cosine": float(got @ ref / (got.norm() * ref.norm()))}


def main() -> None:
    start = time.time()
    rows = []
    for layers, width in SIZES:
        ref = reference(layers, width)
        params = sum(p.numel() for p in gpt2(layers, width, torch.float32).parameters())
        for dtype in (torch.float32, torch.float64):
            variants = [("one_sided", "default", {})]
            variants += [("one_sided", r, {"shared_forward_radius": r}) for r in SWEEP]
            variants += [("central", 1e-2, {"shared_forward_difference": "central", "fd_radius": 1e-2})]
            for difference, radius, config in variants:
                row = {
                    "layers": layers,
                    "width": width,
                    "params": params,
                    "dtype": str(dtype).split(".")[1],
                    "difference": difference,
                    "radius": radius,
                    **compare(estimate(layers, width, dtype, **config), ref),
                }
                rows.append(row)
                print(
                    f"{params / 1e6:5.2f}M {row['dtype']:>7} {difference:>9} r={radius!s:>7}: "
                    f"rel err {row['rel_err']:.2e}  cosine {row['cosine']:.7f}",
                    flush=True,
                )
    out = Path(__file__).resolve().parent / "results" / "shared_forward_accuracy.json"
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/shared_forward_accuracy.py",
                "wall_s": round(time.time() - start, 1),
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
