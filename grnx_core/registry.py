"""The component registry: finds plugins through entry points and looks components up by name.

Plugins are pluggy plugins found in the entry-point group ``grnx``. Each implements some of the
``grnx_register_<kind>s(register)`` hooks. Registration may be lazy (``"module:Class"``), so
listing names never imports heavy libraries such as torch.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import pluggy

from grnx_core import hookspecs
from grnx_core.components import KIND_BASES, Component, Kind
from grnx_core.errors import PluginError

ENTRY_POINT_GROUP = "grnx"


@dataclass
class ComponentEntry:
    """One registered component; ``target`` is a class or a lazy ``"module:Class"`` string."""

    kind: Kind
    name: str
    target: str | type[Component]
    plugin: str
    plugin_version: str
    _loaded: type[Component] | None = field(default=None, repr=False)

    def load(self) -> type[Component]:
        """Import (if lazy) and check the component class."""
        if self._loaded is not None:
            return self._loaded
        if isinstance(self.target, str):
            module_name, _, attribute = self.target.partition(":")
            try:
                module = importlib.import_module(module_name)
                cls = getattr(module, attribute)
            except Exception as error:
                raise PluginError(
                    f"{self.kind.value} {self.name!r} from plugin {self.plugin!r} failed to import "
                    f"({self.target}): {type(error).__name__}: {error}. Reinstall or fix that plugin; "
                    f"`grnx plugins` lists what loads."
                ) from error
        else:
            cls = self.target
        base = KIND_BASES[self.kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"{self.kind.value} {self.name!r} from plugin {self.plugin!r} is {cls!r}, "
                f"which is not a subclass of grnx_core.{base.__name__}."
            )
        if getattr(cls, "name", None) != self.name:
            raise PluginError(
                f"Plugin {self.plugin!r} registered {self.kind.value} {self.name!r}, but the class "
                f"{cls.__name__} says its name is {getattr(cls, 'name', None)!r}."
            )
        self._loaded = cls
        return cls


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, kept so ``grnx plugins`` can report it."""

    plugin: str
    error: str


class Registry:
    """All components by kind and name."""

    def __init__(self, plugin_manager: pluggy.PluginManager | None = None) -> None:
        self.plugin_manager = plugin_manager or new_plugin_manager()
        self.entries: dict[Kind, dict[str, ComponentEntry]] = {kind: {} for kind in Kind}
        self.conflicts: dict[tuple[Kind, str], list[ComponentEntry]] = {}
        self.failures: list[PluginFailure] = []
        self.plugin_versions: dict[str, str] = {}

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> Registry:
        """Load every plugin installed in the entry-point group (built-ins included)."""
        registry = cls()
        for entry_point in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            distribution = entry_point.dist
            plugin_name = entry_point.name
            version = distribution.version if distribution is not None else "unknown"
            try:
                plugin = entry_point.load()
            except Exception as error:  # a broken plugin must not hide the others
                registry.failures.append(
                    PluginFailure(plugin_name, f"{type(error).__name__}: {error} ({entry_point.value})")
                )
                continue
            registry.add_plugin(plugin, plugin_name, version)
        return registry

    def add_plugin(self, plugin: Any, name: str, version: str = "unknown") -> None:
        """Register a pluggy plugin object (usually a module) and collect its components."""
        try:
            self.plugin_manager.register(plugin, name=name)
        except ValueError as error:
            self.failures.append(PluginFailure(name, f"could not register: {error}"))
            return
        self.plugin_versions[name] = version
        for kind_value, hook_name in hookspecs.REGISTRATION_HOOKS.items():
            kind = Kind(kind_value)
            for implementation in getattr(self.plugin_manager.hook, hook_name).get_hookimpls():
                if implementation.plugin_name != name:
                    continue
                try:
                    implementation.function(register=self._register_callback(kind, name, version))
                except PluginError as error:
                    self.failures.append(PluginFailure(name, str(error)))
                except Exception as error:
                    self.failures.append(
                        PluginFailure(name, f"{hook_name} raised {type(error).__name__}: {error}")
                    )

    def _register_callback(self, kind: Kind, plugin: str, version: str):
        def register(component: str | type[Component], target: str | None = None) -> None:
            if isinstance(component, str):
                if target is None or ":" not in target:
                    raise PluginError(
                        f"Plugin {plugin!r}: lazy registration of {component!r} needs a target "
                        f"'package.module:ClassName', got {target!r}."
                    )
                entry = ComponentEntry(kind, component, target, plugin, version)
            else:
                entry = ComponentEntry(kind, component.name, component, plugin, version)
            self._add_entry(entry)

        return register

    def _add_entry(self, entry: ComponentEntry) -> None:
        existing = self.entries[entry.kind].get(entry.name)
        if existing is None:
            self.entries[entry.kind][entry.name] = entry
        elif existing.target != entry.target or existing.plugin != entry.plugin:
            self.conflicts.setdefault((entry.kind, entry.name), [existing]).append(entry)

    # -- lookup -------------------------------------------------------------------------------

    def names(self, kind: Kind) -> list[str]:
        return sorted(self.entries[kind])

    def entry(self, kind: Kind, name: str, where: str = "") -> ComponentEntry:
        """The entry for ``name``; unknown names fail with "did you mean" and what is installed."""
        kind = Kind(kind)
        if (kind, name) in self.conflicts:
            claims = self.conflicts[(kind, name)]
            who = " and ".join(
                f"plugin {c.plugin!r} ({c.target if isinstance(c.target, str) else c.target.__module__})"
                for c in claims
            )
            raise PluginError(
                f"Two plugins claim the {kind.value} name {name!r}: {who}. Uninstall one of them."
            )
        if name not in self.entries[kind]:
            raise PluginError(unknown_name_message(kind, name, self.names(kind), where))
        return self.entries[kind][name]

    def get(self, kind: Kind, name: str, where: str = "") -> type[Component]:
        return self.entry(kind, name, where).load()

    def problems(self) -> list[str]:
        """Plugins that failed to load and names claimed twice, as readable lines."""
        lines = [f"plugin {f.plugin!r} failed to load: {f.error}" for f in self.failures]
        for (kind, name), claims in self.conflicts.items():
            plugins = ", ".join(repr(c.plugin) for c in claims)
            lines.append(f"{kind.value} name {name!r} is claimed by several plugins: {plugins}")
        return lines


def unknown_name_message(kind: Kind, name: str, installed: list[str], where: str = "") -> str:
    location = f" at {where}" if where else ""
    close = difflib.get_close_matches(name, installed, n=1, cutoff=0.6)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(installed) if installed else "none"
    return (
        f"Unknown {kind.value} {name!r}{location}.{suggestion} Installed: {listing} "
        f"(see `grnx plugins {kind.value}`)."
    )


def new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    return manager


_default_registry: Registry | None = None


def default_registry() -> Registry:
    """The registry of installed plugins, loaded once per process."""
    global _default_registry
    if _default_registry is None:
        _default_registry = Registry.from_entry_points()
    return _default_registry


def reset_default_registry() -> None:
    """Forget the loaded registry (after installing a plugin in the same process, or in tests)."""
    global _default_registry
    _default_registry = None
