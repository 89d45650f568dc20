"""per_example_causal_lm_loss against a float64 reference, Hugging Face's GPT-2 loss and a memory meter."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scalemlo.hf.losses import per_example_causal_lm_loss


def reference_losses(logits, labels, attention_mask=None):
    """Naive float64 oracle: shift, token cross-entropy, masked mean per example."""
    shifted_logits = logits[:, :-1].double()
    targets = labels[:, 1:]
    counted = targets != -100
    if attention_mask is not None:
        counted &= (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    token_losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
    ).view(targets.shape)
    counts = counted.sum(1)
    return (token_losses * counted).sum(1) / counts.clamp(min=1), counts


def padded_batch(lengths, prompt_lengths, seq_len, vocab, side, seed=0):
    """Token ids, labels (-100 on padding and prompt) and attention mask for examples of given lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    input_ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    labels = torch.full((batch, seq_len), -100, dtype=torch.int64)
    mask = torch.zeros(batch, seq_len, dtype=torch.int64)
    for i, (length, prompt) in enumerate(zip(lengths, prompt_lengths)):
        tokens = torch.randint(0, vocab, (length,), generator=generator)
        start = 0 if side == "right" else seq_len - length
        input_ids[i, start : start + length] = tokens
        mask[i, start : start + length] = 1
        labels[i, start + prompt : start + length] = tokens[prompt:]
    return input_ids, labels, mask


def logits_for(input_ids, mask, vocab, dtype=torch.float32, seed=1):
    """Random logits that depend only on each real token and its index within its example (not on padding)."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, 16, vocab, generator=generator) * 2
    within = (mask.cumsum(1) - 1).clamp(min=0, max=15)
    return table[input_ids, within].to(dtype)


LENGTHS, PROMPTS, SEQ, VOCAB = [9, 4, 12, 1, 6], [0, 2, 5, 0, 6], 12, 37


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 8, 1000])
def test_matches_float64_reference(side, dtype, chunk_tokens):
    input_ids, labels, mask = padded_batch(LENGTHS, PROMPTS, SEQ, VOCAB, side)
    logits = logits_for(input_ids, mask, VOCAB, dtype)
    losses, counts = per_example_causal_lm_loss(logits, labels, mask, chunk_tokens=chunk_tokens)
    expected, expected_counts = reference_losses(logits, labels, mask)
    assert losses.dtype == torch.float32 and counts.dtype == torch.int64 and losses.shape == (5,)
    assert counts.tolist() == expected_counts.tolist() == [8, 2, 7, 0, 0]
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6)
    assert losses[3] == 0 and losses[4] == 0  # length 1 (nothing to predict) and all prompt


def test_left_and_right_padding_agree_and_mask_beats_labels():
    per_side = {}
    for side in ("left", "right"):
        input_ids, labels, mask = padded_batch(LENGTHS, PROMPTS, SEQ, VOCAB, side)
        logits = logits_for(input_ids, mask, VOCAB)
        per_side[side] = per_example_causal_lm_loss(logits, labels, mask)[0]
        # Labels on padding that the mask switches off must not count.
        labels_on_padding = torch.where(mask == 0, input_ids, labels)
        torch.testing.assert_close(per_example_causal_lm_loss(logits, labels_on_padding, mask)[0], per_side[side])
    torch.testing.assert_close(per_side["left"], per_side["right"], rtol=1e-6, atol=1e-6)


def test_result_does_not_depend_on_chunk_size():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 33, 101, generator=generator) * 3
    labels = torch.randint(0, 101, (4, 33), generator=generator)
    labels[1, :20] = -100
    results = [per_example_causal_lm_loss(logits, labels, chunk_tokens=c)[0] for c in (1, 5, 32, 127, 4096)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dtype):
    input_ids, labels, mask = padded_batch(LENGTHS, PROMPTS, SEQ, VOCAB, "left")
    logits = logits_for(input_ids, mask, VOCAB, dtype).requires_grad_()
    upstream = torch.tensor([0.5, -1.0, 2.0, 3.0, 1.5])
    losses, _ = per_example_causal_lm_loss(logits, labels, mask, chunk_tokens=4)
    (grad,) = torch.autograd.grad((upstream * losses).sum(), logits)
    expected_losses, _ = reference_losses(logits, labels, mask)
    (expected,) = torch.autograd.grad((upstream.double() * expected_losses).sum(), logits)
    assert grad.dtype == dtype and grad.shape == logits.shape
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # the gradient is returned in the logits' dtype
    torch.testing.assert_close(grad.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert grad[3].abs().sum() == 0 and grad[4].abs().sum() == 0  # examples with nothing counted


def test_hessian_vector_products_match_reference():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 13, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 13, (3, 6), generator=generator)
    labels[0, :4] = -100
    direction = torch.randn(3, 6, 13, generator=generator, dtype=torch.float64)
    upstream = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def hvp(loss_fn):
        losses = loss_fn()
        (grad,) = torch.autograd.grad((upstream * losses).sum(), logits, create_graph=True)
        return torch.autograd.grad((grad * direction).sum(), logits)[0]

    ours = hvp(lambda: per_example_causal_lm_loss(logits, labels, chunk_tokens=2)[0])
    expected = hvp(lambda: reference_losses(logits, labels)[0])
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-5, atol=1e-6)


def test_non_contiguous_logits():
    generator = torch.Generator().manual_seed(6)
    padded_vocab = torch.randn(2, 9, 40, generator=generator)  # a model whose vocabulary is padded to 40
    logits = padded_vocab[:, :, :29]
    labels = torch.randint(0, 29, (2, 9), generator=generator)
    torch.testing.assert_close(
        per_example_causal_lm_loss(logits, labels, chunk_tokens=3)[0].double(), reference_losses(logits, labels)[0]
    )


def test_agrees_with_hugging_face_gpt2_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    input_ids = torch.randint(0, 97, (3, 16))
    labels = input_ids.clone()
    labels[:, :5] = -100  # the same prompt length everywhere: every example counts 11 targets
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
    losses, counts = per_example_causal_lm_loss(output.logits, labels, torch.ones_like(input_ids))
    assert counts.tolist() == [11, 11, 11]
    torch.testing.assert_close(losses.mean(), output.loss.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logits": torch.zeros(2, 5)}, "logits must be a floating tensor"),
        ({"logits": torch.zeros(2, 5, 7, dtype=torch.int64)}, "logits must be a floating tensor"),
        ({"labels": torch.zeros(2, 4, dtype=torch.int64)}, "labels must be \\[B, T\\]"),
        ({"labels": torch.zeros(2, 5)}, "labels must be integer"),
        ({"attention_mask": torch.ones(2, 4)}, "attention_mask must be"),
        ({"labels": torch.full((2, 5), 7)}, "token ids in \\[0, 7\\)"),
        ({"labels": torch.full((2, 5), -1)}, "token ids in \\[0, 7\\)"),
        ({"chunk_tokens": 0}, "chunk_tokens must be a positive int"),
    ],
)
def test_bad_inputs_are_value_errors(kwargs, message):
    arguments = {"logits": torch.zeros(2, 5, 7), "labels": torch.zeros(2, 5, dtype=torch.int64)} | kwargs
    chunk = arguments.pop("chunk_tokens", 4)
    with pytest.raises(ValueError, match=message):
        per_example_causal_lm_loss(**arguments, chunk_tokens=chunk)


# Memory. The meter is the PyTorch profiler's allocation record: with profile_memory=True every
# allocation and free of the CPU allocator is an "[memory]" event carrying its signed size, so the
# running sum of sizes is the live memory the measured code added, and its maximum is the peak.

B, T, V, CHUNK = 4, 128, 8192, 32
FULL_FLOAT32 = B * T * V * 4  # 16 MiB: one float32 copy of the logits
CHUNK_FLOAT32 = CHUNK * V * 4  # 1 MiB: one float32 piece


def measured_peak_bytes(fn, trace_dir):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()
    trace = trace_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for event in events:
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    del kept
    return peak


def naive_losses(logits, labels):
    """The obvious implementation: float32 upcast, contiguous shift, log_softmax over everything."""
    shifted = logits.float()[:, :-1].contiguous()
    log_probs = torch.log_softmax(shifted, dim=-1)
    targets = labels[:, 1:]
    token = -log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
    return token.sum(1) / (targets != -100).sum(1)


@pytest.fixture(scope="module")
def memory_batch():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(B, T, V, generator=generator, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[:, :10] = -100
    return logits, labels


def test_peak_memory_is_a_few_chunks_not_the_logits(memory_batch, tmp_path):
    logits, labels = memory_batch
    logits = logits.clone().requires_grad_()

    forward = measured_peak_bytes(lambda: per_example_causal_lm_loss(logits, labels, chunk_tokens=CHUNK), tmp_path)
    losses, _ = per_example_causal_lm_loss(logits, labels, chunk_tokens=CHUNK)
    backward = measured_peak_bytes(lambda: torch.autograd.grad(losses.sum(), logits), tmp_path)
    naive = measured_peak_bytes(lambda: naive_losses(logits, labels), tmp_path)
    torch.testing.assert_close(naive_losses(logits, labels), losses, rtol=1e-5, atol=1e-5)

    gradient_bytes = logits.numel() * logits.element_size()  # the gradient the output layer needs
    print(f"peak bytes: forward {forward}, backward {backward}, naive forward {naive}, chunk {CHUNK_FLOAT32}")
    assert forward <= 3 * CHUNK_FLOAT32
    assert backward <= gradient_bytes + 3 * CHUNK_FLOAT32
    # The meter sees what the naive version holds: its float32 copy and shifted copy at once.
    assert naive >= 1.9 * FULL_FLOAT32 > 10 * 3 * CHUNK_FLOAT32


class LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest float32 tensor any aten op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_float32_tensor_larger_than_a_chunk(memory_batch):
    logits, labels = memory_batch
    logits = logits.clone().requires_grad_()  # bf16, so the full-size gradient is bf16 too
    with LargestFloat32() as ours:
        losses, _ = per_example_causal_lm_loss(logits, labels, chunk_tokens=CHUNK)
        torch.autograd.grad(losses.sum(), logits)
    with LargestFloat32() as naive:
        torch.autograd.grad(naive_losses(logits, labels).sum(), logits)
    assert ours.largest == CHUNK * V
    assert naive.largest >= B * (T - 1) * V
