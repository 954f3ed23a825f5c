"""The plugin hub: discovery, the allowlist, broken and duplicate plugins, versioned decoding,
`skillhub plugins`, the conformance suite, and the two plugin distributions in a real pack.

Fake plugins are real distributions as importlib.metadata sees them: a ``*.dist-info``
directory with ``entry_points.txt`` and a module, on a directory added to ``sys.path``.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from skillhub import create_pack
from skillhub.cli import main
from skillhub.errors import OperatorError, RecipeError
from skillhub.operators import BlockEncoded, Encoded, get_operator, operator_names
from skillhub.operators.discovery import catalog, refresh
from skillhub.pack.format import load_pack
from skillhub.testing import DEFAULT_SHAPES, check_operator, conformance_checks

BUILTINS = ["lowrank", "magnitude-prune", "raw", "rtn", "svd", "svd-mixed"]
PLUGINS = {"dare": "skillhub-dare", "bitdelta": "skillhub-bitdelta"}


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def fresh_discovery() -> Iterator[None]:
    """Each test sees the plugins installed at its start, and leaves no cached discovery behind."""
    refresh()
    yield
    refresh()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A directory on sys.path where tests install fake plugin distributions."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))

    def install(distribution: str, version: str, operators: dict[str, str], module: str, source: str) -> None:
        info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        entries = "".join(f"{name} = {module}:{target}\n" for name, target in operators.items())
        (info / "entry_points.txt").write_text(f"[skillhub.operators]\n{entries}")
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(module, None)  # an earlier test may have imported another module of that name
        refresh()

    return install


RAW_LIKE = '''
    import torch
    from skillhub.operators import Encoded

    class Op:
        name = "{name}"
        version = "{version}"
        decodes = {decodes!r}
        params_schema = {{"type": "object", "additionalProperties": False, "properties": {{}}}}

        def encode(self, delta, params, ctx):
            return Encoded(tensors={{"values": delta.clone()}})

        def decode(self, tensors, meta, params, shape, *, version):
            # Data written by 1.x stored the delta doubled; 2.x stores it as is.
            scale = 0.5 if version.startswith("1.") else 1.0
            return (tensors["values"] * scale).reshape(shape)
'''


def raw_like(name: str, version: str = "1.0", decodes: str | None = None) -> str:
    return RAW_LIKE.format(name=name, version=version, decodes=decodes)


def recipe_file(tmp_path: Path, rules: list[dict[str, Any]], name: str = "plugins") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "rules": rules}))
    return path


# --------------------------------------------------------------------------- the real plugin distributions


def test_both_plugins_are_discovered_after_pip_install() -> None:
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)["operators"]}
    for name, distribution in PLUGINS.items():
        row = rows[name]
        assert (row["status"], row["distribution"], row["builtin"]) == ("ok", distribution, False)
        assert row["version"] == "1.0" and row["params_schema"]["type"] == "object"
    for name in BUILTINS:
        assert (rows[name]["status"], rows[name]["distribution"], rows[name]["builtin"]) == ("ok", "skillhub", True)
    human = cli("plugins")
    assert "skillhub-dare 0.1.0" in human.output and "plugin" in human.output and "built-in" in human.output


@pytest.mark.parametrize("name", BUILTINS + list(PLUGINS))
def test_every_operator_passes_the_conformance_suite(name: str) -> None:
    # 300x500 with small ranks takes the randomized-SVD path of the SVD operators.
    check_operator(get_operator(name), shapes=[*DEFAULT_SHAPES, (300, 500)])


def test_a_recipe_uses_both_plugins_and_the_manifest_records_them(plugin_pack) -> None:
    used = {entry.operator for entry in plugin_pack.modules.values()}
    assert {"dare", "bitdelta"} <= used
    for name, distribution in PLUGINS.items():
        assert plugin_pack.manifest["operators"][name] == {
            "version": "1.0", "distribution": distribution, "distribution_version": "0.1.0"}
    assert plugin_pack.manifest["operators"]["raw"]["distribution"] == "skillhub"
    for module, entry in plugin_pack.modules.items():
        if entry.operator == "dare":
            assert entry.params == {"drop": 0.5, "dtype": "float16"} and entry.operator_version == "1.0"
    assert "operator:dare" in (plugin_pack.path / "README.md").read_text()


def test_a_plugin_pack_decodes_and_applies(plugin_pack, finetuned, tmp_path: Path) -> None:
    from skillhub_bitdelta import BitDeltaOperator

    opened = load_pack(plugin_pack.path)  # sha256 verified
    name = next(m for m, e in opened.modules.items() if e.operator == "bitdelta")
    entry = opened.modules[name]
    expected = BitDeltaOperator().decode(opened.fields(name), entry.meta, entry.params, entry.shape, version="1.0")
    assert torch.equal(opened.decode(name), expected)
    result = cli("apply", str(finetuned.base), str(plugin_pack.path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_parameter(name).shape == entry.shape


def test_filtering_a_plugin_out_makes_its_packs_fail_with_the_documented_message(
        plugin_pack, finetuned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKILLHUB_LOAD_PLUGINS", "skillhub-bitdelta")
    assert "dare" not in operator_names() and "bitdelta" in operator_names()
    result = cli("apply", str(finetuned.base), str(plugin_pack.path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: pack 'pack' module ") and "needs operator dare 1.0 (from skillhub-dare)" in message
    assert "add skillhub-dare to SKILLHUB_LOAD_PLUGINS" in message
    assert not (tmp_path / "out").exists()
    result = cli("add", str(plugin_pack.path), "--task", "shift", "--no-eval")
    assert result.exit_code == 1 and "needs operator dare 1.0" in result.output
    assert json.loads(cli("list", "--json").output) == []
    # Inspecting does not decode: it still works and shows what the pack needs.
    assert cli("inspect", str(plugin_pack.path)).exit_code == 0


@pytest.mark.parametrize("allowlist,expected", [
    ("", set()),
    ("skillhub-dare", {"dare"}),
    ("dare, bitdelta", {"dare", "bitdelta"}),  # operator names work too, spaces are ignored
    ("Skillhub_BitDelta", {"bitdelta"}),  # distribution names compare in normal form
])
def test_allowlist(allowlist: str, expected: set[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKILLHUB_LOAD_PLUGINS", allowlist)
    assert set(operator_names()) == set(BUILTINS) | expected
    assert set(catalog().filtered) == set(PLUGINS) - expected


def test_discovery_is_cached_and_lazy(site) -> None:
    site("lazy-plugin", "1.0", {"lazy": "Op"}, "lazy_module", raw_like("lazy"))
    assert "lazy" in operator_names() and "lazy_module" not in sys.modules  # listed, not imported
    first = get_operator("lazy")
    assert "lazy_module" in sys.modules and get_operator("lazy") is first
    assert catalog() is catalog()


# --------------------------------------------------------------------------- broken and duplicate plugins


def test_a_broken_plugin_is_listed_and_does_not_break_other_commands(site, paper_pack, finetuned,
                                                                     tmp_path: Path) -> None:
    site("broken-plugin", "0.3", {"broken": "Op"}, "broken_module", "raise ImportError('needs libfoo.so')\n")
    result = cli("plugins", "--json")
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)["operators"]}
    assert rows["broken"]["status"] == "broken" and rows["broken"]["distribution"] == "broken-plugin"
    assert "broken-plugin 0.3" in rows["broken"]["error"] and "ImportError: needs libfoo.so" in rows["broken"]["error"]
    assert all(rows[name]["status"] == "ok" for name in BUILTINS + list(PLUGINS))
    human = cli("plugins")
    assert human.exit_code == 0 and "ImportError: needs libfoo.so" in human.output
    checked = cli("plugins", "--check")
    assert checked.exit_code == 1 and "broken (broken-plugin)" in checked.output
    # Commands that do not need it work.
    assert cli("inspect", str(paper_pack.path)).exit_code == 0
    applied = cli("apply", str(finetuned.base), str(paper_pack.path), "-o", str(tmp_path / "out"))
    assert applied.exit_code == 0, applied.output
    # One that names it gets a one-line error naming the distribution and the exception.
    recipe = recipe_file(tmp_path, [{"match": {"pattern": "."}, "operator": "broken"}])
    failed = cli("create", str(finetuned.base), str(finetuned.tuned), "-o", str(tmp_path / "p"), "--recipe", str(recipe))
    assert failed.exit_code == 1
    assert "operator 'broken' from broken-plugin 0.3 is broken: ImportError: needs libfoo.so" in failed.output


@pytest.mark.parametrize("source,problem", [
    (raw_like("other-name"), "differs from its entry-point name"),
    (raw_like("badver", version="1"), "is not a 'MAJOR.MINOR' string"),
    (raw_like("baddecodes", decodes="==2.*"), "cannot decode its own version 1.0"),
    (raw_like("badspec", decodes="not a spec"), "is not a version specifier"),
    (raw_like("badschema").replace('"type": "object", ', '"type": "objekt", '), "not a valid JSON Schema"),
])
def test_a_plugin_breaking_the_contract_is_broken(site, source: str, problem: str) -> None:
    name = source.split('name = "')[1].split('"')[0]
    site("contract-plugin", "1.0", {"entry": "Op"} if name == "other-name" else {name: "Op"}, "contract_module", source)
    entry = "entry" if name == "other-name" else name
    with pytest.raises(OperatorError, match=problem) as info:
        get_operator(entry)
    assert "contract-plugin 1.0" in str(info.value)


def test_duplicate_operator_names_are_an_error_naming_both(site, tmp_path: Path, monkeypatch) -> None:
    site("first-plugin", "1.0", {"twin": "Op"}, "first_module", raw_like("twin"))
    site("second-plugin", "2.0", {"twin": "Op"}, "second_module", raw_like("twin"))
    with pytest.raises(OperatorError) as info:
        get_operator("twin")
    assert "first-plugin 1.0 and second-plugin 2.0" in str(info.value)
    rows = [r for r in json.loads(cli("plugins", "--json").output)["operators"] if r["name"] == "twin"]
    assert [(r["distribution"], r["status"]) for r in rows] == [("first-plugin", "conflict"), ("second-plugin", "conflict")]
    assert get_operator("raw").name == "raw"  # the rest is unaffected
    # The allowlist picks one.
    monkeypatch.setenv("SKILLHUB_LOAD_PLUGINS", "second-plugin")
    assert get_operator("twin").name == "twin" and catalog().usable["twin"].distribution == "second-plugin"


def test_a_plugin_shadowing_a_builtin_name_is_a_conflict(site) -> None:
    site("shadow-plugin", "1.0", {"raw": "Op"}, "shadow_module", raw_like("raw"))
    with pytest.raises(OperatorError, match="shadow-plugin 1.0 and skillhub 0.1.0"):
        get_operator("raw")


# --------------------------------------------------------------------------- params and versions


@pytest.mark.parametrize("command", ["create", "add"])
def test_invalid_plugin_params_are_refused_before_any_tensor_is_read(command: str, tmp_path: Path) -> None:
    recipe = recipe_file(tmp_path, [{"match": {"pattern": "."}, "operator": "dare", "params": {"drop": 1.5, "dtyp": 1}}])
    missing = str(tmp_path / "no-such-model")  # reading any tensor would fail on this instead
    args = ["create", missing, missing, "-o", str(tmp_path / "p")] if command == "create" else \
        ["add", "--from", missing, missing, "--task", "t"]
    result = cli(*args, "--recipe", str(recipe))
    assert result.exit_code == 1
    message = result.output.strip()
    assert "invalid params for operator 'dare'" in message and "drop" in message and "dtyp" in message
    assert "no-such-model" not in message
    assert not (tmp_path / "p").exists()


def test_an_unknown_operator_in_a_recipe_lists_the_installed_ones(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="unknown operator 'nope'.*bitdelta.*dare"):
        from skillhub.compress.recipe import Recipe

        Recipe({"name": "x", "rules": [{"match": {"pattern": "."}, "operator": "nope"}]})


def _pack_with(site, finetuned, tmp_path: Path, *, version: str, decodes: str | None = None):
    site("versioned-plugin", "0.2", {"versioned": "Op"}, "versioned_module", raw_like("versioned", version, decodes))
    recipe = recipe_file(tmp_path, [{"match": {"pattern": "."}, "operator": "versioned"}])
    return create_pack(finetuned.base, finetuned.tuned, tmp_path / "pack", task="shift", recipe=recipe)


def test_decode_dispatches_on_the_stored_version(site, finetuned, tmp_path: Path) -> None:
    pack = _pack_with(site, finetuned, tmp_path, version="1.0")
    module = next(iter(pack.modules))
    stored = pack.fields(module)["values"]
    assert torch.equal(pack.decode(module), 0.5 * stored)  # the 1.x path of this fake operator
    # A 2.1 release that still reads 1.x data: the pack keeps decoding through the 1.x path.
    (tmp_path / "site" / "versioned_module.py").write_text(textwrap.dedent(raw_like("versioned", "2.1", ">=1.0,<3")))
    sys.modules.pop("versioned_module", None)
    refresh()
    assert get_operator("versioned").version == "2.1"
    assert torch.equal(load_pack(pack.path).decode(module), 0.5 * stored)


def test_a_version_the_installed_plugin_cannot_decode_names_operator_version_and_distribution(
        site, finetuned, tmp_path: Path) -> None:
    pack = _pack_with(site, finetuned, tmp_path, version="3.0")
    (tmp_path / "site" / "versioned_module.py").write_text(textwrap.dedent(raw_like("versioned", "2.1", ">=1.0,<3")))
    sys.modules.pop("versioned_module", None)
    refresh()
    with pytest.raises(OperatorError) as info:
        load_pack(pack.path).decode(next(iter(pack.modules)))
    message = str(info.value)
    assert "needs operator versioned 3.0 (from versioned-plugin)" in message
    assert "the installed versioned-plugin 0.2 provides versioned 2.1, which decodes versioned <3,>=1.0 only" in message
    result = cli("apply", str(finetuned.base), str(pack.path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "needs operator versioned 3.0" in result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_operator_names_the_distribution_to_install(site, finetuned, tmp_path: Path) -> None:
    pack = _pack_with(site, finetuned, tmp_path, version="1.0")
    shutil.rmtree(next((tmp_path / "site").glob("versioned_plugin-*.dist-info")))
    refresh()
    with pytest.raises(OperatorError) as info:
        load_pack(pack.path).require_operators()
    assert "needs operator versioned 1.0 (from versioned-plugin), which is not installed: pip install versioned-plugin" \
        in str(info.value)


# --------------------------------------------------------------------------- the conformance suite catches bad operators


class _Base:
    name = "base-op"
    version = "1.0"
    params_schema: dict[str, Any] = {
        "type": "object", "additionalProperties": False,
        "properties": {"scale": {"type": "number", "minimum": 0, "default": 1.0}},
    }

    def encode(self, delta, params, ctx):
        return Encoded(tensors={"values": delta.to(torch.float16)})

    def decode(self, tensors, meta, params, shape, *, version):
        return tensors["values"].to(torch.float32).reshape(shape)

    def expected_fields(self, meta, params, shape, *, version):
        return {"values": (torch.float16, tuple(shape))}


class _GlobalRandom(_Base):
    def encode(self, delta, params, ctx):
        return Encoded(tensors={"values": (delta + 1e-3 * torch.randn(delta.shape)).to(torch.float16)})


class _InPlace(_Base):
    def encode(self, delta, params, ctx):
        delta.mul_(1.0)
        delta[0] = 0
        return super().encode(delta, params, ctx)


class _WrongDtype(_Base):
    def decode(self, tensors, meta, params, shape, *, version):
        return tensors["values"].reshape(shape)


class _WrongShape(_Base):
    def decode(self, tensors, meta, params, shape, *, version):
        return tensors["values"].to(torch.float32).reshape(-1)


class _TensorMeta(_Base):
    def encode(self, delta, params, ctx):
        return Encoded(tensors={"values": delta.to(torch.float16)}, meta={"norm": torch.linalg.norm(delta)})


class _Stateful(_Base):
    def encode(self, delta, params, ctx):
        self.scale = float(delta.abs().max())
        return Encoded(tensors={"values": (delta / self.scale).to(torch.float16)})

    def decode(self, tensors, meta, params, shape, *, version):
        return (tensors["values"].to(torch.float32) * getattr(self, "scale", 1.0)).reshape(shape)


class _LaxSchema(_Base):
    params_schema: dict[str, Any] = {"type": "object", "properties": {"scale": {"default": 1.0}}}


class _Lossy(_Base):
    def decode(self, tensors, meta, params, shape, *, version):
        return torch.zeros(shape)


class _NoLayout(_Base):
    expected_fields = None


class _LyingLayout(_Base):
    def expected_fields(self, meta, params, shape, *, version):
        return {"values": (torch.float32, tuple(shape))}


class _LaxMeta(_Base):
    """Records a count in meta but never checks it."""

    def encode(self, delta, params, ctx):
        return Encoded(tensors={"values": delta.to(torch.float16)}, meta={"count": delta.numel()})


class _WrongFactors(_Base):
    """Claims low-rank factors that are not its delta (PEFT export would write them)."""

    def factors(self, tensors, meta, params, shape, *, version):
        rows = shape[0]
        return torch.ones(rows, 1), torch.ones(1, tensors["values"].numel() // rows)


class _BlockByBlock(_Base):
    """Encodes row blocks each on its own: float16 of every block but the last, which it drops."""

    def encode_blocks(self, delta, params, ctx):
        blocks = list(delta)
        values = torch.cat([*blocks[:-1], torch.zeros_like(blocks[-1])]).to(torch.float16).reshape(delta.shape)
        return BlockEncoded(Encoded(tensors={"values": values}), squared_error=0.0)


@pytest.mark.parametrize("operator,check,message", [
    (_GlobalRandom(), "determinism", "differs between two encodes"),
    (_BlockByBlock(), "row-blocks", "field values differs"),
    (_WrongFactors(), "factors", "B @ A differs from decode"),
    (_InPlace(), "round-trip", "encode modified its input delta"),
    (_WrongDtype(), "round-trip", "not torch.float32"),
    (_WrongShape(), "round-trip", "returned shape"),
    (_TensorMeta(), "round-trip", "Object of type Tensor is not JSON serializable"),
    (_Stateful(), "byte-accounting", "differs from decoding in memory"),
    (_Lossy(), "round-trip", "relative error 1.0000 exceeds 0.1"),
    (_NoLayout(), "expected-fields", "has no expected_fields"),
    (_LyingLayout(), "expected-fields", "expected_fields says .*torch.float32.*encode stored .*torch.float16"),
    (_LaxMeta(), "expected-fields", "accepted the impossible meta {}"),
], ids=lambda x: x if isinstance(x, str) else type(x).__name__)
def test_conformance_catches(operator: Any, check: str, message: str) -> None:
    checks = {c.name: c for c in conformance_checks(operator, installed=False, max_relative_error=0.1)}
    with pytest.raises(AssertionError, match=message):
        checks[check]()
    check_operator(_Base(), installed=False, max_relative_error=0.1)  # the well-behaved one passes


def test_conformance_catches_params_that_should_be_refused() -> None:
    with pytest.raises(AssertionError, match="invalid-params.*were accepted"):
        check_operator(_Base(), installed=False, invalid=[{"scale": 2.0}])  # the schema allows it
    checks = {c.name: c for c in conformance_checks(_LaxSchema(), installed=False)}
    checks["invalid-params"]()  # nothing to refuse is not a failure...
    with pytest.raises(AssertionError, match="were accepted"):
        {c.name: c for c in conformance_checks(_LaxSchema(), installed=False, invalid=[{"other": 1}])}["invalid-params"]()


def test_conformance_requires_registration_when_installed() -> None:
    with pytest.raises(AssertionError, match="registered.*no usable entry point named 'base-op'"):
        check_operator(_Base())
