"""The operator conformance suite: what every compression operator must do, built-in or plugin.

A plugin's own tests call it (see plugins/README.md)::

    from skillhub.testing import check_operator

    def test_conformance():
        check_operator(MyOperator(), max_relative_error=0.5)

or, to get one pytest test per check::

    @pytest.mark.parametrize("check", conformance_checks(MyOperator()), ids=str)
    def test_conformance(check):
        check()

The checks: the contract (name, ``MAJOR.MINOR`` version, a valid params JSON Schema whose
defaults and examples satisfy it, ``decodes``), registration through the entry point,
refusal of invalid params naming the bad field, round trip (float32 of the original shape,
finite, input untouched, JSON-able meta, optional error bound), determinism under a seed
whatever the global RNG state, byte accounting through a real pack written and read
back with its sha256 and sizes verified, and ``expected_fields``: it must name exactly the
stored tensors with their dtypes and shapes, and refuse impossible meta (none at all, or a
whole number in it set to -1 or 10**12: whole numbers in meta are counts, ranks and widths);
for an operator with ``factors``, that they multiply to what decode returns, and with
``encode_blocks``, that row blocks give encode's bytes. Failures are ``AssertionError`` naming
the check.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import torch

from skillhub.errors import OperatorError
from skillhub.operators import (
    BlockEncoded, EncodeContext, Encoded, Operator, encode_module, expected_fields, resolve_params,
)
from skillhub.operators.discovery import catalog, contract_problems, load

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((64, 96), (96, 40))
_FIELD_NAME = r"^[A-Za-z0-9_.]+$"
_PARAMETER = "model.layers.0.mlp.up_proj.weight"
# Values of every JSON type; for each param the suite picks one its schema refuses.
_CANDIDATES: tuple[Any, ...] = ("not-a-valid-value", -1, 0, 10**12, 0.5, -0.5, [], {}, None, True, [[-1]])


@dataclass(frozen=True)
class Check:
    """One conformance check, callable with no arguments (raises AssertionError on failure)."""

    name: str
    run: Callable[[], None]

    def __call__(self) -> None:
        try:
            self.run()
        except AssertionError as exc:
            raise AssertionError(f"conformance check {self.name!r} failed: {exc}") from exc

    def __str__(self) -> str:
        return self.name


def conformance_checks(
    operator: Operator,
    *,
    params: Sequence[Mapping[str, Any]] | None = None,
    invalid: Iterable[Mapping[str, Any]] = (),
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    max_relative_error: float | None = None,
    installed: bool = True,
    seed: int = 0,
) -> list[Check]:
    """The conformance checks for ``operator``.

    Args:
        operator: An operator instance.
        params: Params to exercise it with (each validated and defaulted first). Default: the
            ``examples`` of its params schema, else ``{}`` (its defaults).
        invalid: Params the operator must refuse, besides those the suite derives from the schema.
        shapes: Delta shapes to encode (the operator must accept each one).
        max_relative_error: If given, ``||delta - decoded|| / ||delta||`` must stay below it on the
            suite's test deltas (a low-rank signal plus noise).
        installed: Also check that the ``skillhub.operators`` entry point of ``operator.name``
            loads this operator (false for an operator that is not installed).
        seed: Seed of the test deltas and of the encode context.
    """
    cases = [dict(p) for p in (params if params is not None else operator.params_schema.get("examples", [{}]))]
    checks = [Check("contract", lambda: _check_contract(operator))]
    if installed:
        checks.append(Check("registered", lambda: _check_registered(operator)))
    checks += [
        Check("invalid-params", lambda: _check_invalid_params(operator, list(invalid))),
        Check("round-trip", lambda: _check_round_trip(operator, cases, shapes, max_relative_error, seed)),
        Check("determinism", lambda: _check_determinism(operator, cases, shapes, seed)),
        Check("byte-accounting", lambda: _check_byte_accounting(operator, cases, shapes, seed)),
        Check("expected-fields", lambda: _check_expected_fields(operator, cases, shapes, seed)),
    ]
    if hasattr(operator, "factors"):
        checks.append(Check("factors", lambda: _check_factors(operator, cases, shapes, seed)))
    if hasattr(operator, "encode_blocks"):
        checks.append(Check("row-blocks", lambda: _check_row_blocks(operator, cases, shapes, seed)))
    return checks


def check_operator(operator: Operator, **options: Any) -> None:
    """Run every conformance check (options as :func:`conformance_checks`); the first failure raises."""
    for check in conformance_checks(operator, **options):
        check()


# --------------------------------------------------------------------------- the checks


def _check_contract(operator: Operator) -> None:
    problems = contract_problems(operator)
    assert not problems, "; ".join(problems)
    schema = operator.params_schema
    validator = jsonschema.validators.validator_for(schema)(schema)
    for number, example in enumerate(schema.get("examples", []), start=1):
        errors = [e.message for e in validator.iter_errors(example)]
        assert not errors, f"params schema example {number} {example} is invalid: {errors}"


def _check_registered(operator: Operator) -> None:
    source = catalog().usable.get(operator.name)
    assert source is not None, (
        f"no usable entry point named {operator.name!r} in group skillhub.operators: "
        "register the operator in your pyproject's [project.entry-points.\"skillhub.operators\"] and install it"
    )
    loaded = load(source)
    assert type(loaded) is type(operator), f"the entry point {source.target} loads {type(loaded).__name__}"


def _check_invalid_params(operator: Operator, invalid: list[Mapping[str, Any]]) -> None:
    for given, field in [(p, None) for p in invalid] + derived_invalid_params(operator):
        try:
            resolve_params(operator, given, where="conformance")
        except OperatorError as exc:
            message = str(exc)
            assert repr(operator.name) in message, f"the error for {given} does not name the operator: {message}"
            if field is not None:
                assert field in message, f"the error for {given} does not name the field {field!r}: {message}"
        else:
            raise AssertionError(f"invalid params {given} were accepted")


def derived_invalid_params(operator: Operator) -> list[tuple[dict[str, Any], str]]:
    """For each declared param a value its own schema refuses, and an unknown param if the
    schema forbids extra ones: (params, field the error must name)."""
    schema = operator.params_schema
    validator_cls = jsonschema.validators.validator_for(schema)
    base = resolve_params(operator, _first_example(schema), where="conformance")
    cases = []
    for key, spec in schema.get("properties", {}).items():
        refused = [v for v in _CANDIDATES if not validator_cls(spec).is_valid(v)]
        if refused:  # a param that accepts anything has no invalid value
            cases.append(({**base, key: refused[0]}, key))
    if schema.get("additionalProperties") is False:
        cases.append(({**base, "no_such_param": 1}, "no_such_param"))
    return cases


def _first_example(schema: Mapping[str, Any]) -> dict[str, Any]:
    return dict(schema.get("examples", [{}])[0])


def _check_round_trip(operator: Operator, cases: list[dict[str, Any]], shapes: Sequence[tuple[int, ...]],
                      bound: float | None, seed: int) -> None:
    for given, shape in _grid(cases, shapes):
        params = resolve_params(operator, given, where="conformance")
        delta = sample_delta(shape, seed=seed)
        pristine = delta.clone()
        encoded = operator.encode(delta, copy.deepcopy(params), _context(seed))
        where = f"params {given}, shape {shape}"
        assert torch.equal(delta, pristine), f"{where}: encode modified its input delta"
        _check_encoded(encoded, where)
        try:
            meta = json.loads(json.dumps(encoded.meta))
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"{where}: meta is not JSON: {exc}") from exc
        assert meta == encoded.meta, f"{where}: meta does not survive a JSON round trip"
        decoded = operator.decode(encoded.tensors, meta, params, tuple(shape), version=operator.version)
        assert isinstance(decoded, torch.Tensor), f"{where}: decode returned {type(decoded).__name__}"
        assert decoded.dtype == torch.float32, f"{where}: decode returned {decoded.dtype}, not torch.float32"
        assert tuple(decoded.shape) == tuple(shape), f"{where}: decode returned shape {tuple(decoded.shape)}"
        assert bool(torch.isfinite(decoded).all()), f"{where}: decode returned NaN or Inf"
        if bound is not None:
            error = relative_error(delta, decoded)
            assert error <= bound, f"{where}: relative error {error:.4f} exceeds {bound}"


def _check_expected_fields(operator: Operator, cases: list[dict[str, Any]], shapes: Sequence[tuple[int, ...]],
                           seed: int) -> None:
    """``expected_fields`` names exactly the stored tensors with their dtypes and shapes, and refuses
    meta that cannot be right: none at all, or any whole number in it negative or absurdly large."""
    assert getattr(operator, "expected_fields", None) is not None, (
        "the operator has no expected_fields(meta, params, shape, *, version): without it skillhub can check "
        "a pack's stored tensors only by decoding them"
    )
    for given, shape in _grid(cases, shapes):
        params = resolve_params(operator, given, where="conformance")
        encoded = operator.encode(sample_delta(shape, seed=seed), copy.deepcopy(params), _context(seed))
        where = f"params {given}, shape {shape}"
        layout = expected_fields(operator, encoded.meta, params, tuple(shape), version=operator.version)
        actual = {name: (t.dtype, tuple(t.shape)) for name, t in encoded.tensors.items()}
        expected = {name: (dtype, tuple(s)) for name, (dtype, s) in (layout or {}).items()}
        assert expected == actual, f"{where}: expected_fields says {expected}, encode stored {actual}"
        broken = [{}] if encoded.meta else []
        for key, value in encoded.meta.items():
            if type(value) is int:
                broken += [{**encoded.meta, key: -1}, {**encoded.meta, key: 10**12}]
        for meta in broken:
            try:
                expected_fields(operator, meta, params, tuple(shape), version=operator.version)
            except ValueError:
                continue
            raise AssertionError(f"{where}: expected_fields accepted the impossible meta {meta}")


def _check_factors(operator: Operator, cases: list[dict[str, Any]], shapes: Sequence[tuple[int, ...]],
                   seed: int) -> None:
    """``factors`` (optional) gives B (m x r) and A (r x n) whose product is what decode returns."""
    for given, shape in _grid(cases, shapes):
        if len(shape) < 2:
            continue
        params = resolve_params(operator, given, where="conformance")
        encoded = operator.encode(sample_delta(shape, seed=seed), copy.deepcopy(params), _context(seed))
        where = f"params {given}, shape {shape}"
        b, a = operator.factors(encoded.tensors, encoded.meta, params, tuple(shape), version=operator.version)
        rows, cols = shape[0], math.prod(shape[1:])
        assert b.shape[0] == rows and a.shape[1] == cols and b.shape[1] == a.shape[0], (
            f"{where}: factors {list(b.shape)} x {list(a.shape)} do not make a {rows} x {cols} matrix")
        decoded = operator.decode(encoded.tensors, encoded.meta, params, tuple(shape), version=operator.version)
        error = relative_error(decoded.reshape(rows, cols), b.float() @ a.float())
        assert error <= 1e-5, f"{where}: B @ A differs from decode by {error:.2e} (relative)"


def _check_row_blocks(operator: Operator, cases: list[dict[str, Any]], shapes: Sequence[tuple[int, ...]],
                      seed: int) -> None:
    """``encode_blocks`` (optional) stores what ``encode`` stores, byte for byte, from the delta's row
    blocks, and reports the squared error decode will have."""
    for given, shape in _grid(cases, shapes):
        params = resolve_params(operator, given, where="conformance")
        delta = sample_delta(shape, seed=seed)
        whole = encode_module(operator, delta, copy.deepcopy(params), _context(seed))
        streamed = operator.encode_blocks(RowsInMemory(delta, rows=3), copy.deepcopy(params), _context(seed))
        where = f"params {given}, shape {shape}"
        assert isinstance(streamed, BlockEncoded), f"{where}: encode_blocks returned {type(streamed).__name__}"
        assert streamed.encoded.meta == whole.encoded.meta, f"{where}: encode_blocks' meta differs from encode's"
        assert list(streamed.encoded.tensors) == list(whole.encoded.tensors), f"{where}: the fields differ"
        for name, tensor in whole.encoded.tensors.items():
            got = streamed.encoded.tensors[name]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), f"{where}: field {name} differs"
        error = streamed.squared_error**0.5
        assert abs(error - whole.error_norm) <= 1e-5 * (whole.delta_norm + whole.error_norm), (
            f"{where}: encode_blocks reports an error of {error:.6g}, decoding gives {whole.error_norm:.6g}")


class RowsInMemory:
    """A delta held in memory, handed out as :class:`skillhub.operators.DeltaBlocks`: flat blocks of
    ``rows`` rows each."""

    def __init__(self, delta: torch.Tensor, *, rows: int) -> None:
        self.delta, self.rows, self.shape = delta, rows, tuple(delta.shape)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.shape[0], self.rows):
            yield self.delta[start:start + self.rows].reshape(-1)


def _check_encoded(encoded: Any, where: str) -> None:
    assert isinstance(encoded, Encoded), f"{where}: encode returned {type(encoded).__name__}, not Encoded"
    assert encoded.tensors, f"{where}: encode stored no tensors"
    field = jsonschema.Draft202012Validator({"type": "string", "pattern": _FIELD_NAME})
    for name, tensor in encoded.tensors.items():
        assert field.is_valid(name), f"{where}: field name {name!r} must match {_FIELD_NAME}"
        assert isinstance(tensor, torch.Tensor), f"{where}: field {name} is a {type(tensor).__name__}"


def _check_determinism(operator: Operator, cases: list[dict[str, Any]], shapes: Sequence[tuple[int, ...]],
                       seed: int) -> None:
    for given, shape in _grid(cases, shapes):
        params = resolve_params(operator, given, where="conformance")
        delta = sample_delta(shape, seed=seed)
        runs = []
        for global_seed in (1, 2):  # randomness must come from the context, not the global RNG
            torch.manual_seed(global_seed)
            result = encode_module(operator, delta, copy.deepcopy(params), _context(seed))
            runs.append((result.encoded, result.decoded))
        (first, first_decoded), (second, second_decoded) = runs
        where = f"params {given}, shape {shape}"
        assert first.meta == second.meta, f"{where}: meta differs between two encodes with the same seed"
        assert first.tensors.keys() == second.tensors.keys(), f"{where}: fields differ between two encodes"
        for name in first.tensors:
            a, b = first.tensors[name], second.tensors[name]
            assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: field {name} differs between two encodes"
        assert torch.equal(first_decoded, second_decoded), f"{where}: decode is not deterministic"


def _check_byte_accounting(operator: Operator, cases: list[dict[str, Any]], shapes: Sequence[tuple[int, ...]],
                           seed: int) -> None:
    """Write every case as one module of a real pack; the pack's recorded sizes must be the
    tensors' own bytes and decoding the stored tensors must give what decoding in memory gave."""
    from skillhub.pack.format import PackWriter, load_pack

    expected: dict[str, tuple[torch.Tensor, int]] = {}
    with tempfile.TemporaryDirectory(prefix="skillhub-conformance-") as tmp:
        staging = Path(tmp) / "pack"
        staging.mkdir()
        writer = PackWriter(staging)
        modules: dict[str, dict[str, Any]] = {}
        for number, (given, shape) in enumerate(_grid(cases, shapes)):
            params = resolve_params(operator, given, where="conformance")
            delta = sample_delta(shape, seed=seed)
            module = f"model.layers.{number}.mlp.up_proj.weight"
            result = encode_module(operator, delta, copy.deepcopy(params), _context(seed, name=module))
            stored = writer.add_module(module, {k: v.detach().cpu() for k, v in result.encoded.tensors.items()})
            assert stored == result.stored_bytes, f"params {given}, shape {shape}: the pack stores {stored} " \
                                                  f"bytes, the tensors hold {result.stored_bytes}"
            modules[module] = _module_entry(operator, params, result.encoded, shape, stored, result.relative_error)
            expected[module] = (result.decoded, result.stored_bytes)
        writer.finish(_manifest(operator, modules), "conformance pack\n")
        pack = load_pack(staging, verify=True)  # sha256, sizes and per-module stored bytes
        assert pack.manifest.stored_bytes == sum(b for _, b in expected.values())
        fresh = type(operator)()  # operators are stateless: a new instance decodes what another encoded
        for module, (decoded, _) in expected.items():
            entry = pack.modules[module]
            again = fresh.decode(pack.fields(module), entry.meta, entry.params, entry.shape,
                                 version=entry.operator_version)
            assert torch.equal(again, decoded), f"{module}: decoding the stored tensors differs from decoding in memory"


def _module_entry(operator: Operator, params: dict[str, Any], encoded: Encoded, shape: tuple[int, ...],
                  stored: int, error: float) -> dict[str, Any]:
    return {
        "role": "mlp", "operator": operator.name, "operator_version": operator.version, "params": params,
        "meta": encoded.meta, "shape": list(shape), "dtype": "float32", "fields": list(encoded.tensors),
        "stored_bytes": stored, "delta_fp16_bytes": 2 * math.prod(shape), "error": error,
    }


def _manifest(operator: Operator, modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from skillhub import __version__
    from skillhub.pack.manifest import totals

    parameters = sum(math.prod(e["shape"]) for e in modules.values())
    return {
        "format": "skillpack", "format_version": 1, "name": "conformance", "task": "conformance",
        "version": "1.0.0", "created_at": "2026-01-01T00:00:00Z", "skillhub_version": __version__, "parent": None,
        "base": {"id": "conformance-base", "revision": None, "architecture": None, "model_type": None,
                 "fingerprint": "sha256:" + "0" * 64, "dtype": "float32"},
        "recipe": {"name": "conformance", "rules": [{"match": {"pattern": ".*"}, "operator": operator.name}]},
        "operators": {operator.name: {"version": operator.version}},
        "quantizer": {"method": "rtn"},
        "modules": modules, "unchanged": [],
        "totals": totals(modules, parameters=parameters, delta_fp16_bytes=2 * parameters,
                         squared_error=0.0, squared_norm=0.0),
    }


# --------------------------------------------------------------------------- helpers


def sample_delta(shape: Sequence[int], *, seed: int = 0, rank: int = 8) -> torch.Tensor:
    """A float32 delta like a fine-tune's: a decaying low-rank signal plus noise, of ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    rows = shape[0] if len(shape) > 1 else 1
    cols = math.prod(shape) // rows
    k = max(1, min(rank, rows, cols))
    signal = (torch.randn(rows, k, generator=gen) * 0.7 ** torch.arange(k)) @ torch.randn(k, cols, generator=gen)
    return (0.01 * signal + 1e-3 * torch.randn(rows, cols, generator=gen)).reshape(shape)



def relative_error(delta: torch.Tensor, decoded: torch.Tensor) -> float:
    """||delta - decoded||_F / ||delta||_F."""
    return float(torch.linalg.vector_norm(delta - decoded) / torch.linalg.vector_norm(delta))


def _context(seed: int, name: str = _PARAMETER) -> EncodeContext:
    return EncodeContext(name=name, role="mlp", seed=seed)


def _grid(cases: list[dict[str, Any]], shapes: Sequence[tuple[int, ...]]) -> list[tuple[dict[str, Any], tuple[int, ...]]]:
    return [(case, tuple(shape)) for case in cases for shape in shapes]
