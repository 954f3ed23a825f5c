"""Shared fixtures: isolated state, and one real tiny fine-tune shared by the whole session."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from skillhub.synthetic import build_tiny_model, split_examples, write_jsonl
from skillhub.tensorfile import TensorFile
from skillhub.train import finetune

TASK = "shift"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every user directory at a temp dir and keep the Hub unreachable."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SKILLHUB_HOME", str(home / "skillhub"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SKILLHUB_DEBUG", raising=False)
    monkeypatch.delenv("SKILLHUB_DEVICE", raising=False)
    monkeypatch.delenv("SKILLHUB_LOAD_PLUGINS", raising=False)


@dataclass(frozen=True)
class FineTune:
    """A tiny Llama base, its full fine-tune on a synthetic task, and held-out examples."""

    base: Path
    tuned: Path
    test: list[dict[str, str]]
    calib: Path  # JSONL of training prompts/answers, for calibration
    heldout: Path  # JSONL of the held-out test prompts/answers


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> FineTune:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("finetune")
    train, test = split_examples(TASK, train=2000, test=200)
    base = build_tiny_model(root / "base", seed=0)
    tuned = finetune(base, train, root / "tuned", steps=300, seed=0)
    return FineTune(base=base, tuned=tuned, test=test, calib=write_jsonl(train[:600], root / "calib.jsonl"),
                    heldout=write_jsonl(test, root / "heldout.jsonl"))


@pytest.fixture(scope="session")
def paper_pack(finetuned: FineTune, tmp_path_factory: pytest.TempPathFactory):
    """The fine-tune compressed with the paper recipe (read-only: copy before modifying)."""
    from skillhub import create_pack

    return create_pack(finetuned.base, finetuned.tuned, tmp_path_factory.mktemp("packs") / TASK, task=TASK)


@pytest.fixture(scope="session")
def plugin_pack(finetuned: FineTune, tmp_path_factory: pytest.TempPathFactory):
    """The fine-tune compressed with a recipe naming both plugin operators like built-ins
    (needs plugins/skillhub-dare and plugins/skillhub-bitdelta installed, as `make test` does)."""
    from skillhub import create_pack

    recipe = {"name": "plugins", "rules": [
        {"match": {"role": ["embedding", "head"]}, "operator": "magnitude-prune", "params": {"keep": 0.1, "bits": 4}},
        {"match": {"role": "attention"}, "operator": "bitdelta"},
        {"match": {"role": "mlp"}, "operator": "dare", "params": {"drop": 0.5}},
        {"match": {"role": ["norm", "bias", "other"]}, "operator": "raw"},
    ]}
    return create_pack(finetuned.base, finetuned.tuned, tmp_path_factory.mktemp("plugin-pack") / "pack",
                       task=TASK, recipe=recipe)


def copy_tree(source: Path, destination: Path) -> Path:
    """Copy a model or pack directory so a test may damage it."""
    shutil.copytree(source, destination)
    return destination


def edit_tensors(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite a single-file checkpoint's weights through ``edit`` (which mutates the dict)."""
    weights = model_dir / "model.safetensors"
    source = TensorFile(weights)
    tensors = {name: source.read(name).clone() for name in source.keys()}
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return model_dir


def edit_config(model_dir: Path, **changes: Any) -> Path:
    """Overwrite keys of a checkpoint's config.json."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="session")
def three_packs(finetuned: FineTune, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Packs of three real fine-tunes of the same base (shift, reverse, sort), paper recipe."""
    from skillhub import create_pack

    root = tmp_path_factory.mktemp("three")
    packs = {}
    for task in ("shift", "reverse", "sort"):
        if task == "shift":
            tuned = finetuned.tuned
        else:
            train, _ = split_examples(task, train=1000, test=10)
            tuned = finetune(finetuned.base, train, root / f"tuned-{task}", steps=60, seed=0)
        packs[task] = create_pack(finetuned.base, tuned, root / task, task=task).path
    return packs


def _postgres_admin_url() -> str | None:
    import os

    return os.environ.get("SKILLHUB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres:skillhub-ci@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_factory(request: pytest.FixtureRequest, tmp_path: Path):
    """Makes fresh, independent registries on the backend under test (PostgreSQL skips if no server answers)."""
    from skillhub.registry import Registry

    if request.param == "sqlite":
        counter = iter(range(100))
        yield lambda: Registry(tmp_path / f"registry-{next(counter)}")
        return
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(_postgres_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text("select 1"))
    except Exception:  # noqa: BLE001 - any failure to connect means no server here
        admin.dispose()
        pytest.skip("no PostgreSQL server answers at SKILLHUB_TEST_POSTGRES_URL")
    created: list[str] = []

    def make() -> Registry:
        name = f"skillhub_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(sa.text(f"CREATE DATABASE {name}"))
        created.append(name)
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        return Registry(url, store=tmp_path / f"store-{name}")

    yield make
    with admin.connect() as connection:
        for name in created:
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()
