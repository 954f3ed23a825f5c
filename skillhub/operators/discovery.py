"""Finding operators: the ``skillhub.operators`` entry points of every installed distribution.

Discovery is lazy and cached. Reading entry points costs only metadata lookups; an
operator's module is imported the first time that operator is needed, so a plugin that
fails to import breaks only the commands that use it (``skillhub plugins`` lists it as
broken with its distribution and exception). ``SKILLHUB_LOAD_PLUGINS`` restricts which
plugins are considered (see :func:`skillhub.config.plugin_allowlist`); built-ins, which
skillhub registers through its own entry points, are always loaded. Two distributions
registering the same operator name make that name unusable until one is removed or
filtered out: silently picking one would decode packs with the wrong code.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import jsonschema
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from skillhub import config
from skillhub.errors import OperatorError

if TYPE_CHECKING:
    from skillhub.operators import Operator

ENTRY_POINT_GROUP = "skillhub.operators"
BUILTIN_DISTRIBUTION = "skillhub"
_VERSION = re.compile(r"^[0-9]+\.[0-9]+$")


def normalize(name: str) -> str:
    """A distribution name in its PEP 503 normal form (``Skillhub_DARE`` -> ``skillhub-dare``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class OperatorSource:
    """One entry point of the ``skillhub.operators`` group: where an operator comes from."""

    name: str
    target: str  # "module:attribute"
    distribution: str
    distribution_version: str
    entry_point: metadata.EntryPoint = field(compare=False, repr=False)

    @property
    def builtin(self) -> bool:
        return normalize(self.distribution) == BUILTIN_DISTRIBUTION

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.distribution_version}"


@dataclass(frozen=True)
class Catalog:
    """Every operator entry point, sorted by what may be used."""

    usable: dict[str, OperatorSource]  # one distribution provides it and it is allowed
    conflicts: dict[str, tuple[OperatorSource, ...]]  # several distributions register the name
    filtered: dict[str, OperatorSource]  # installed, but SKILLHUB_LOAD_PLUGINS leaves it out
    allowlist: tuple[str, ...] | None

    def installed(self, name: str) -> OperatorSource | None:
        """The source of ``name`` whether or not it may be used (the first one if several)."""
        if name in self.conflicts:
            return self.conflicts[name][0]
        return self.usable.get(name) or self.filtered.get(name)


def catalog() -> Catalog:
    """Every installed operator, with SKILLHUB_LOAD_PLUGINS applied (cached per allowlist)."""
    return _catalog(config.plugin_allowlist())


@functools.cache
def _catalog(allowlist: tuple[str, ...] | None) -> Catalog:
    by_name: dict[str, dict[str, OperatorSource]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        source = OperatorSource(
            name=ep.name,
            target=ep.value,
            distribution=dist.name if dist else "unknown distribution",
            distribution_version=dist.version if dist else "?",
            entry_point=ep,
        )
        # The same distribution seen twice (e.g. on two sys.path entries) is not a conflict.
        by_name.setdefault(ep.name, {}).setdefault(normalize(source.distribution), source)
    usable: dict[str, OperatorSource] = {}
    conflicts: dict[str, tuple[OperatorSource, ...]] = {}
    filtered: dict[str, OperatorSource] = {}
    allowed = {normalize(item) for item in allowlist} if allowlist is not None else None
    for name, sources in sorted(by_name.items()):
        kept = [s for s in sources.values() if allowed is None or s.builtin
                or normalize(s.distribution) in allowed or normalize(s.name) in allowed]
        if len(kept) > 1:
            conflicts[name] = tuple(sorted(kept, key=lambda s: normalize(s.distribution)))
        elif kept:
            usable[name] = kept[0]
        else:
            filtered[name] = next(iter(sources.values()))
    return Catalog(usable=usable, conflicts=conflicts, filtered=filtered, allowlist=allowlist)


def refresh() -> None:
    """Forget what discovery has cached, e.g. after installing a plugin in this process."""
    importlib.invalidate_caches()
    _catalog.cache_clear()
    _loaded.clear()


def operator_names() -> list[str]:
    """Names of every usable operator, sorted."""
    return sorted(catalog().usable)


def get_operator(name: str) -> Operator:
    """The installed operator called ``name``, loaded on first use.

    Raises:
        OperatorError: It is unknown, filtered out by SKILLHUB_LOAD_PLUGINS, registered by two
            distributions, or its plugin fails to load.
    """
    found = catalog()
    if name in found.conflicts:
        both = " and ".join(s.label for s in found.conflicts[name])
        raise OperatorError(
            f"operator {name!r} is registered by more than one distribution: {both}; "
            "uninstall one of them, or name the one to use in SKILLHUB_LOAD_PLUGINS"
        )
    if name in found.filtered:
        source = found.filtered[name]
        raise OperatorError(
            f"operator {name!r} comes from {source.label}, which SKILLHUB_LOAD_PLUGINS does not list; "
            f"add {source.distribution} to SKILLHUB_LOAD_PLUGINS to use it"
        )
    source = found.usable.get(name)
    if source is None:
        raise OperatorError(
            f"unknown operator {name!r}; installed operators: {', '.join(operator_names())}. "
            "If it comes from a plugin, install that plugin's distribution"
        )
    return load(source)


_loaded: dict[OperatorSource, Operator | OperatorError] = {}


def load(source: OperatorSource) -> Operator:
    """Import and check the operator an entry point names (cached, failures included).

    Raises:
        OperatorError: The plugin fails to import or does not honour the operator contract;
            the message names the operator, its distribution and the exception.
    """
    if source not in _loaded:
        try:
            _loaded[source] = _instantiate(source)
        except Exception as exc:  # a broken plugin must not take the caller down with a traceback
            problem = exc if isinstance(exc, OperatorError) else f"{type(exc).__name__}: {exc}"
            _loaded[source] = OperatorError(f"operator {source.name!r} from {source.label} is broken: {problem}")
    outcome = _loaded[source]
    if isinstance(outcome, OperatorError):
        raise outcome
    return outcome


def _instantiate(source: OperatorSource) -> Any:
    target = source.entry_point.load()
    # The entry point names a class or a zero-argument factory; an instance is accepted too.
    operator = target if hasattr(target, "encode") and not isinstance(target, type) else target()
    problems = contract_problems(operator, expected_name=source.name)
    if problems:
        raise OperatorError("; ".join(problems))
    return operator


def contract_problems(operator: Any, *, expected_name: str | None = None) -> list[str]:
    """What keeps ``operator`` from honouring the operator contract (empty if nothing)."""
    problems = []
    name = getattr(operator, "name", None)
    if not isinstance(name, str) or not name:
        problems.append("it has no string `name`")
    elif expected_name is not None and name != expected_name:
        problems.append(f"its name {name!r} differs from its entry-point name {expected_name!r}")
    version = getattr(operator, "version", None)
    if not isinstance(version, str) or not _VERSION.match(version):
        problems.append(f"its version {version!r} is not a 'MAJOR.MINOR' string")
    else:
        try:
            decodes = decodable(operator)
        except (InvalidSpecifier, TypeError) as exc:
            problems.append(f"its `decodes` is not a version specifier: {exc}")
        else:
            if Version(version) not in decodes:
                problems.append(f"it cannot decode its own version {version} (decodes {decodes})")
    for method in ("encode", "decode"):
        if not callable(getattr(operator, method, None)):
            problems.append(f"it has no `{method}` method")
    schema = getattr(operator, "params_schema", None)
    if not isinstance(schema, dict):
        problems.append("its `params_schema` is not a JSON Schema object")
    else:
        validator_cls = jsonschema.validators.validator_for(schema)
        try:
            validator_cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            problems.append(f"its params_schema is not a valid JSON Schema: {exc.message}")
        else:
            if schema.get("type") != "object":
                problems.append('its params_schema must describe an object ("type": "object")')
            for key, spec in schema.get("properties", {}).items():
                if isinstance(spec, dict) and "default" in spec and not validator_cls(spec).is_valid(spec["default"]):
                    problems.append(f"the default of param {key!r} does not satisfy its own schema")
    return problems


def decodable(operator: Any) -> SpecifierSet:
    """The operator versions whose data ``operator`` decodes: its ``decodes`` specifier, by
    default every version of its own major (``==MAJOR.*``)."""
    declared = getattr(operator, "decodes", None)
    if declared is None:
        return SpecifierSet(f"=={operator.version.split('.')[0]}.*")
    return SpecifierSet(declared)


def decoder_for(name: str, version: str, *, provenance: dict[str, Any] | None, where: str) -> Operator:
    """The installed operator that decodes data written by operator ``name`` at ``version``.

    Args:
        name: Operator name recorded in a pack.
        version: Operator version recorded for the module.
        provenance: The pack's record of that operator (``distribution``...), if it has one.
        where: What is being decoded, e.g. ``"pack 'x' module model.layers.0.mlp.up_proj.weight"``.

    Raises:
        OperatorError: Naming the operator, the version and the distribution to install.
    """
    distribution = (provenance or {}).get("distribution")
    wanted = f"{name} {version}" + (f" (from {distribution})" if distribution else "")
    install = f"pip install {distribution}" if distribution else "install the distribution that provides it"
    found = catalog()
    if found.installed(name) is None:
        raise OperatorError(f"{where} needs operator {wanted}, which is not installed: {install}")
    try:
        operator = get_operator(name)
    except OperatorError as exc:
        raise OperatorError(f"{where} needs operator {wanted}: {exc}") from exc
    try:
        stored = Version(version)
    except InvalidVersion as exc:
        raise OperatorError(f"{where} records operator {name} at version {version!r}, which is not a version") from exc
    if stored not in decodable(operator):
        source = found.usable[name]
        raise OperatorError(
            f"{where} needs operator {wanted}, but the installed {source.label} provides {name} "
            f"{operator.version}, which decodes {name} {decodable(operator)} only; "
            f"install a {distribution or source.distribution} release whose {name} decodes {version}"
        )
    return operator


def provenance(operator: Operator) -> dict[str, str]:
    """What a pack records about an operator it used, so a reader knows what to install."""
    source = catalog().usable.get(operator.name)
    record = {"version": operator.version}
    if source is not None:
        record.update(distribution=source.distribution, distribution_version=source.distribution_version)
    return record


def report() -> list[dict[str, Any]]:
    """Every operator entry point, loaded, as ``skillhub plugins`` shows it: status ``ok``,
    ``broken`` (with the error), ``conflict`` (one row per distribution) or ``filtered``
    (left out by SKILLHUB_LOAD_PLUGINS), sorted by name."""
    found = catalog()
    rows = []
    for source in found.usable.values():
        try:
            operator = load(source)
        except OperatorError as exc:
            rows.append(_row(source, "broken", error=str(exc)))
        else:
            rows.append(_row(source, "ok", operator=operator))
    for name, sources in found.conflicts.items():
        others = ", ".join(s.label for s in sources)
        rows += [_row(s, "conflict", error=f"operator {name!r} is registered by {others}") for s in sources]
    rows += [_row(s, "filtered", error="not listed in SKILLHUB_LOAD_PLUGINS") for s in found.filtered.values()]
    return sorted(rows, key=lambda r: (r["name"], r["distribution"]))


def _row(source: OperatorSource, status: str, *, operator: Any = None, error: str | None = None) -> dict[str, Any]:
    return {
        "name": source.name,
        "status": status,
        "version": operator.version if operator is not None else None,
        "decodes": str(decodable(operator)) if operator is not None else None,
        "distribution": source.distribution,
        "distribution_version": source.distribution_version,
        "builtin": source.builtin,
        "entry_point": source.target,
        "params_schema": operator.params_schema if operator is not None else None,
        "error": error,
    }
