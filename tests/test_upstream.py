"""The private names of transformers, accelerate and DeepSpeed scalemlo uses: present in the installed versions,
listed in the docs, and a missing one refused by name before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalemlo import upstream

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", sorted(upstream.TESTED))
def test_the_installed_versions_have_every_class_level_name(package):
    assert upstream.missing(package) == []
    upstream.require(package)


@pytest.mark.parametrize("internal", upstream.INTERNALS, ids=lambda i: f"{i.owner}.{i.name}")
def test_every_listed_name_is_used_where_the_list_says(internal):
    for path in internal.used_in.split(", "):
        assert internal.name in (ROOT / path).read_text(), f"{internal.name} is not used in {path}"
    assert upstream._resolve(internal.owner) is not None


def test_the_docs_print_the_list():
    status = (ROOT / "docs" / "status.md").read_text()
    assert upstream.table() in status


def test_a_missing_name_is_refused_naming_it_and_the_tested_version(monkeypatch):
    import transformers

    monkeypatch.delattr(transformers.Trainer, "_get_output_dir")
    with pytest.raises(upstream.UpstreamError, match=r"Trainer\._get_output_dir .*transformers 5\.x"):
        upstream.require("transformers")


def test_the_trainer_refuses_before_it_builds_anything(monkeypatch, tmp_path):
    import transformers

    from scalemlo.hf import ReweightingArguments, ReweightingTrainer

    monkeypatch.delattr(transformers.Trainer, "_save_checkpoint")
    args = ReweightingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with pytest.raises(upstream.UpstreamError, match="_save_checkpoint"):
        ReweightingTrainer(model=None, args=args, train_dataset=[], meta_dataset=[])
    assert not (tmp_path / "out").exists()


def test_no_private_name_of_those_libraries_is_used_outside_the_list():
    """Every ``._name`` read on an object of transformers, accelerate or DeepSpeed in scalemlo/ is listed.
    Checked by the names themselves: each private attribute scalemlo reads that is not its own."""
    import re

    own = set()
    for path in (ROOT / "scalemlo").rglob("*.py"):
        own.update(re.findall(r"def (_\w+)\(", path.read_text()))
        own.update(re.findall(r"self\.(_\w+) *[:=]", path.read_text()))
    listed = {i.name for i in upstream.INTERNALS}
    # private names of the standard library, numpy and torch, which are not what this list is about
    elsewhere = {"_exit", "_actions", "_core", "_reconstruct", "_dynamo", "_is_view", "_is_mkldnn_fp16_supported"}
    allowed = listed | own | elsewhere
    unknown = {}
    for path in (ROOT / "scalemlo").rglob("*.py"):
        for name in re.findall(r"[\w\)\]]\.(_[a-z]\w*)", path.read_text()):
            if name not in allowed:
                unknown.setdefault(name, path.name)
    assert unknown == {}, f"private names used but not listed in scalemlo/upstream.py: {unknown}"


def test_every_private_method_of_those_libraries_overridden_is_listed():
    import importlib
    import inspect
    import pkgutil

    import scalemlo

    upstream_packages = tuple(upstream.TESTED)
    listed = {(i.owner.partition(":")[2].rsplit(".", 1)[-1], i.name) for i in upstream.INTERNALS}
    overridden = set()
    for info in pkgutil.walk_packages(scalemlo.__path__, "scalemlo."):
        if info.name.startswith("scalemlo.cli.") and info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            for name in vars(cls):
                if not name.startswith("_") or name.startswith("__"):
                    continue
                for base in cls.__mro__[1:]:
                    if base.__module__.split(".")[0] in upstream_packages and name in vars(base):
                        overridden.add((base.__name__, name))
    assert {(owner, name) for owner, name in overridden if (owner, name) not in listed} == set()
    assert ("Trainer", "_save_checkpoint") in overridden  # the check sees an override it should
