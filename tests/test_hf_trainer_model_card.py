"""The model card ``save_model`` writes (``README.md``), as TRL's trainers do, so ``push_to_hub`` publishes it.

Its YAML front matter is parsed with ``yaml``; its learned source weights are checked against an independent
computation from the weighting model's own parameters (the ``source`` scheme's softmax α and the source
counts: an example's weight is α of its source over the training set's mean α) and, for the Meta-Weight-Net,
against the checkpoint's ``weights.json`` written beside it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from test_hf_trainer import trainer

from scalemlo.distributed import ensure_distributed
from scalemlo.hf import reset_trainer_state

NOISY = [i % 4 == 0 for i in range(64)]  # hf_toy: every 4th training row is noise, source 1


def read_card(directory) -> tuple[dict, str]:
    """(front matter, Markdown body) of directory/README.md."""
    text = (directory / "README.md").read_text()
    match = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def table_rows(body: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row starting with ``first_cell``."""
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in\n{body}")


@pytest.fixture(scope="module", autouse=True)
def trainer_state():
    """The Trainer's process-wide state kept for the module (the tests share one trained trainer), then reset."""
    ensure_distributed()
    yield
    reset_trainer_state()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The source scheme after 6 steps, evaluated once (the card reports the last evaluation)."""
    from datasets import Dataset
    from hf_toy import rows

    t = trainer(tmp_path_factory.mktemp("card"), eval_dataset=Dataset.from_list(rows(8, 0, 7)))
    t.train()
    t.evaluate()
    return t


def test_the_card_names_the_scheme_method_data_and_learned_source_weights(tmp_path, trained):
    trained.model_card_metrics = {"heldout_loss": 2.25, "heldout_loss_uniform": 2.5}
    trained.save_model(str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()  # the Trainer's save, then the card
    front, body = read_card(tmp_path)
    assert front["library_name"] == "transformers" and front["tags"][:2] == ["scalemlo", "data-reweighting"]
    assert "base_model" not in front and "built from a `GPT2Config` (gpt2, " in body  # no name_or_path
    assert table_rows(body, "reweighting scheme")[1] == "source (SourceWeights)"
    assert table_rows(body, "hypergradient method")[1] == "finite_difference"
    assert table_rows(body, "unroll steps (model steps per meta step)")[1] == "1"
    assert table_rows(body, "optimizer steps")[1] == "6" and table_rows(body, "meta steps")[1] == "5"
    assert "- training set: 64 rows" in body and "- meta set (clean; the weights are judged on it): 16 rows" in body
    # the oracle: alpha from the logits; an example's weight alpha[source] / mean over the training set
    alpha = torch.softmax(trained.reweighter.logits.detach().double(), 0)
    counts = torch.tensor([64 - sum(NOISY), sum(NOISY)], dtype=torch.float64)
    means = alpha / (alpha * counts).sum() * 64
    for index, name in enumerate(["clean", "noisy"]):
        cells = table_rows(body, name)
        assert cells[1] == str(int(counts[index]))
        assert float(cells[2]) == pytest.approx(float(means[index]), abs=1e-4)
        assert float(cells[3]) == pytest.approx(float(alpha[index]), abs=1e-4)
    assert float(table_rows(body, "clean")[2]) > 1 > float(table_rows(body, "noisy")[2])
    assert table_rows(body, "heldout_loss")[1] == "2.25" and table_rows(body, "heldout_loss_uniform")[1] == "2.5"
    eval_loss = [h["eval_loss"] for h in trained.state.log_history if "eval_loss" in h][-1]
    assert float(table_rows(body, "eval_loss")[1]) == pytest.approx(eval_loss, rel=1e-3)


def test_a_model_saved_twice_has_one_card_the_second(tmp_path, trained):
    trained.model_card_metrics = {"heldout_loss": 3.0}
    trained.save_model(str(tmp_path))
    trained.model_card_metrics = {"heldout_loss_clean_only": 2.75}
    trained.save_model(str(tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert text.count("---\n") == 2 and text.count("# Model card for") == 1
    _, body = read_card(tmp_path)
    assert table_rows(body, "heldout_loss_clean_only")[1] == "2.75" and "| heldout_loss |" not in body
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_only_the_main_process_writes_the_card(tmp_path, trained, monkeypatch):
    """A rank other than 0 (emulated: the two tests a Trainer makes) saves neither the model nor the card."""
    monkeypatch.setattr(trained, "is_world_process_zero", lambda: False)
    monkeypatch.setattr(type(trained.args), "should_save", property(lambda self: False))
    trained.save_model(str(tmp_path / "rank1"))
    trained.create_model_card(output_dir=str(tmp_path / "rank1"))
    assert not (tmp_path / "rank1" / "README.md").exists()


def test_push_to_hub_uploads_the_card(trained, monkeypatch):
    """push_to_hub saves, writes the card (titled by the repo) and uploads output_dir: the upload is faked."""
    import transformers.trainer

    seen = {}

    class FakeApi:
        def upload_folder(self, folder_path, **kwargs):
            seen["card"] = open(f"{folder_path}/README.md").read()

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(trained, "hub_model_id", "someone/tiny-reweighted")  # as init_hf_repo would set them
    monkeypatch.setattr(trained.args, "hub_model_id", "someone/tiny-reweighted")
    trained.push_to_hub(dataset_name="someone/counting")
    text = seen["card"]
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["model_name"] == "tiny-reweighted" and front["datasets"] == ["someone/counting"]
    assert "# Model card for tiny-reweighted" in text and "| noisy |" in text


def test_a_hub_base_model_and_the_meta_weight_net_in_a_checkpoint(tmp_path):
    """A model from the Hub (its name_or_path) is the front matter's base_model; a checkpoint holds the card,
    whose per-source weights are its weights.json's (the same scores: computed once for both)."""
    t = trainer(tmp_path, reweighting="meta_weight_net", save_strategy="steps", save_steps=3)
    t.model.config._name_or_path = "openai-community/gpt2"
    calls = []
    score = t.score
    t.score = lambda *a, **k: calls.append(1) or score(*a, **k)
    t.train()
    checkpoint = tmp_path / "checkpoint-6"
    front, body = read_card(checkpoint)
    assert front["base_model"] == "openai-community/gpt2" and "[openai-community/gpt2](https://huggingface.co/" in body
    assert table_rows(body, "reweighting scheme")[1] == "meta_weight_net (MetaWeightNet)"
    exported = json.loads((checkpoint / "weights.json").read_text())["sources"]
    assert len(calls) == 2  # checkpoints 3 and 6, each scored once for the card and the export
    for name, weight in exported.items():
        assert float(table_rows(body, name)[2]) == pytest.approx(weight, abs=1e-4)
    assert len(table_rows(body, "0")) == 3  # no softmax column: the scheme has none
