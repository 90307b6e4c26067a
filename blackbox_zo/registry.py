"""One registry class for everything found by name: oracles, problems, experiments, estimators,
simulators, and the conformance checks of kinds the engine does not know.

Each kind has one `Registry`, filled two ways:

* in-process: ``@ORACLES.register("my-sim-v1")`` (or the module-level shorthands
  `register_oracle`, `register_problem`, `register_experiment`, `register_estimator`);
* by installed packages: the entry-point group ``blackbox_zo.<kind>s`` (e.g.
  ``blackbox_zo.oracles``), loaded the first time a name is looked up or listed, so a
  third-party package adds a name without touching this repository. This repository's own
  oracles, problems and experiments are declared there too (``pyproject.toml``), the name
  written once; the engine's own estimators register themselves where they are defined.

One rule for duplicates, everywhere: registering the same object under its name again is a
no-op (a module imported twice), and a *different* object under a taken name is refused —
in-process with a `DuplicateNameError` that names both objects, from an entry point with a
load error (the first one keeps the name). A plug-in that fails to load never breaks the
others: its error is kept in `Registry.errors` and `blackbox-zo list` shows it.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, TypeVar

__all__ = [
    "Registry",
    "UnknownNameError",
    "DuplicateNameError",
    "plugin_errors",
    "registries",
    "ORACLES",
    "PROBLEMS",
    "EXPERIMENTS",
    "ESTIMATORS",
    "CLI_COMMANDS",
    "SIMULATORS",
    "CHECKS",
]

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name no registry entry and no installed entry point provides."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class DuplicateNameError(ValueError):
    """A different object under a name that is already registered."""


def _describe(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{name}"


_ALL: list["Registry[Any]"] = []


class Registry(Generic[T]):
    """Names -> objects of one kind, with the entry-point group ``blackbox_zo.<plural>``.

    `kind` is the singular used in messages ("oracle"); `plural` names the group
    (default `kind + "s"`); `builtins` names the module (or modules) whose import registers the
    built-in entries, imported at the first lookup (so that reading a config does not import torch).
    Mapping-like: ``name in reg``, ``reg[name]``, ``reg.names()``.
    """

    def __init__(self, kind: str, plural: str | None = None, builtins: str | tuple[str, ...] | None = None):
        self.kind = kind
        self.group = f"blackbox_zo.{plural or kind + 's'}"
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}  # name -> where it came from (for duplicate messages)
        self.errors: dict[str, str] = {}  # entry-point name -> why it did not load
        self._seen_entry_points: set[tuple[str, str]] = set()
        _ALL.append(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} names, group {self.group!r})"

    # -- filling --------------------------------------------------------------------

    def add(self, name: str, obj: T, origin: str | None = None) -> T:
        """Register `obj` under `name` (the one duplicate rule); returns `obj`."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old is not obj:
            raise DuplicateNameError(
                f"{self.kind} name {name!r} is already registered to {_describe(old)} "
                f"({self._origins.get(name, 'in-process')}); refusing {_describe(obj)}"
                f"{f' ({origin})' if origin else ''}: choose another name, e.g. a new version suffix")
        self._entries[name] = obj
        self._origins.setdefault(name, origin or "registered in-process")
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` on a class or factory."""

        def decorate(obj: T) -> T:
            return self.add(name, obj)

        return decorate

    def load_plugins(self) -> dict[str, str]:
        """Load the built-ins and every entry point of this registry's group not loaded yet;
        returns the errors so far."""
        if self._builtins is not None:
            modules, self._builtins = self._builtins, None
            for module in (modules,) if isinstance(modules, str) else modules:
                import_module(module)
        for ep in entry_points(group=self.group):
            key = (ep.name, ep.value)
            if key in self._seen_entry_points:
                continue
            self._seen_entry_points.add(key)
            origin = f"entry point {ep.name} = {ep.value}"
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not break the others
                self.errors[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            try:
                self.add(ep.name, obj, origin)
            except DuplicateNameError as exc:
                self.errors[ep.name] = str(exc)
        return dict(self.errors)

    # -- lookup ---------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        if self._builtins is None and name in self._entries:
            return True
        self.load_plugins()
        return name in self._entries

    def get(self, name: str) -> T:
        """The object registered under `name`; `UnknownNameError` listing the known names otherwise."""
        if name in self:
            return self._entries[name]
        known = ", ".join(self.available()) or "(none)"
        failed = f" ({name!r} failed to load: {self.errors[name]})" if name in self.errors else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{failed}; known: {known}")

    __getitem__ = get

    def names(self) -> list[str]:
        """Registered names in registration order (entry points loaded first)."""
        self.load_plugins()
        return list(self._entries)

    def available(self) -> dict[str, T]:
        """{name: object}, sorted by name, entry points loaded first."""
        self.load_plugins()
        return dict(sorted(self._entries.items()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def registries() -> list[Registry[Any]]:
    """Every registry created so far (one per kind)."""
    return list(_ALL)


def plugin_errors() -> dict[str, str]:
    """``"group:name" -> error`` for every entry point that failed to load, over all registries."""
    return {f"{r.group}:{name}": err for r in _ALL for name, err in sorted(r.errors.items())}


# The registries of blackbox_zo. The engine's estimators register themselves in
# blackbox_zo/estimators.py; this repository's oracles, problems, experiments and
# simulators through its pyproject.toml entry points, exactly as a plug-in does.
ORACLES: Registry[Any] = Registry("oracle")
PROBLEMS: Registry[Any] = Registry("problem")
EXPERIMENTS: Registry[Any] = Registry("experiment")
# the estimators of blackbox_zo/estimators.py, the evolution strategies of blackbox_zo/evolution.py and
# subspace CGE (blackbox_zo/subspace.py)
ESTIMATORS: Registry[Any] = Registry("estimator", builtins=("blackbox_zo.estimators", "blackbox_zo.evolution",
                                                                   "blackbox_zo.subspace"))
# Commands of the `blackbox-zo` CLI that live outside the engine (e.g. `certify`, `serve-onnx`): a class
# with `help`, `add_arguments(parser)` and `run(args) -> int`; its module must import nothing heavy.
CLI_COMMANDS: Registry[Any] = Registry("command")
# Simulators for solver-in-the-loop (`blackbox-zo train sol --set sol.simulator=NAME`): factories
# `(**options) -> Simulator`. The engine holds the names only; the protocol and its checker live
# with the adapters (oracles/simulator.py), found through CHECKS.
SIMULATORS: Registry[Any] = Registry("simulator")
# Conformance checks of kinds defined outside the engine, by kind: CHECKS["simulator"] is a
# function `(name, options) -> report` (with `.ok` and a printable form) for `blackbox-zo check-simulator`.
CHECKS: Registry[Any] = Registry("check")
