"""The plugin state the widgets share and remember across sessions (last data folder, mask test, adapter,
run folder, config) and the per-user data folder; no Qt, no torch at import."""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED = "embedded"


@dataclass
class PluginState:
    """Shared between widgets and remembered across sessions: the last data folder, mask-test result, adapter,
    run folder and config. ``attach(path)`` reads the JSON file once; every ``remember`` writes it back."""

    last_adapter: Path | None = None
    last_run_dir: Path | None = None
    last_mask_test: Path | None = None
    last_data_dir: Path | None = None
    last_config: str | None = None
    # quick lesion checks of trained adapters (`neuromf.generation.adapter_check.AdapterCheck.to_dict`), by `check_key`
    adapter_checks: dict[str, dict] = field(default_factory=dict)
    path: Path | None = None  # the JSON file in the user data folder; None until attached (nothing persisted)
    _vae: tuple[tuple, Any] | None = None
    _adapter_listeners: list = field(default_factory=list)  # weak references to callables(Path)

    REMEMBERED = ("last_adapter", "last_run_dir", "last_mask_test", "last_data_dir", "last_config")

    def attach(self, path: Path) -> None:
        """Read the remembered values from ``path`` (once per state object); missing or broken files are ignored
        (a remembered default is a convenience, never a reason to fail)."""
        if self.path is not None:
            return
        self.path = Path(path)
        try:
            values = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        for key in self.REMEMBERED:
            value = values.get(key) if isinstance(values, dict) else None
            if isinstance(value, str) and value:
                setattr(self, key, value if key == "last_config" else Path(value))
        checks = values.get("adapter_checks") if isinstance(values, dict) else None
        if isinstance(checks, dict):
            self.adapter_checks = {k: v for k, v in checks.items() if isinstance(v, dict)}

    def remember(self, **values: Any) -> None:
        """Set some of the REMEMBERED values and write the file (a few hundred bytes: fine on the GUI thread)."""
        for key, value in values.items():
            if key not in self.REMEMBERED:
                raise KeyError(f"{key!r} is not remembered; choose one of {self.REMEMBERED}")
            setattr(self, key, value if value is None or key == "last_config" else Path(value))
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        data: dict[str, Any] = {key: (str(getattr(self, key)) if getattr(self, key) is not None else None)
                                for key in self.REMEMBERED}
        data["adapter_checks"] = self.adapter_checks
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.path)
        except OSError:  # a read-only home folder: the defaults are just not remembered
            pass

    @staticmethod
    def check_key(adapter: Path | str) -> str:
        """An adapter folder as of its weights' last change: a check holds for the weights it saw, not a retrain."""
        folder = Path(adapter)
        stamps = sorted(f"{p.name}:{p.stat().st_mtime_ns}" for p in folder.glob("*.safetensors")) \
            if folder.is_dir() else []
        return f"{folder.resolve() if folder.is_dir() else folder}|{','.join(stamps)}"

    def adapter_check(self, adapter: Path | str) -> dict | None:
        """The remembered quick lesion check of this adapter's current weights, or None."""
        return self.adapter_checks.get(self.check_key(adapter))

    def remember_check(self, adapter: Path | str, check: dict) -> None:
        """Keep an adapter's quick lesion check (`AdapterCheck.to_dict`) across sessions."""
        self.adapter_checks[self.check_key(adapter)] = dict(check)
        self._write()

    def set_adapter(self, adapter: Path, run_dir: Path | None = None) -> None:
        """Record a newly trained adapter and tell the widgets that default to it."""
        self.remember(last_adapter=adapter, last_run_dir=run_dir)
        alive = []
        for ref in self._adapter_listeners:
            callback = ref()
            if callback is None:
                continue
            try:
                callback(self.last_adapter)
            except RuntimeError:  # the widget behind it was deleted by Qt
                continue
            alive.append(ref)
        self._adapter_listeners = alive

    def on_adapter(self, callback: Any) -> None:
        """Call ``callback(path)`` on each new adapter; bound methods are held weakly."""
        self._adapter_listeners.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__")
                                       else weakref.ref(callback))

    def vae(self, spec: str, preset: str | None = None) -> Any:
        """The VAE for ``spec`` ("embedded" or a local MAISI file), loaded once and kept for the next call."""
        from neuromf.vae import MAISIVAEWrapper

        path = Path(spec)
        key = (str(spec), preset, path.stat().st_mtime if spec != EMBEDDED and path.exists() else None)
        if self._vae is None or self._vae[0] != key:
            self._vae = None  # release the previous one before loading the next
            self._vae = (key, MAISIVAEWrapper.resolve(spec, preset=preset))
        return self._vae[1]

    def default_adapter(self) -> str:
        adapter = self.last_adapter
        return str(adapter) if adapter and (Path(adapter).is_dir() or str(adapter) == EMBEDDED) else EMBEDDED


STATE = PluginState()


def user_folder() -> Path:
    """The per-user data folder (``$NEUROMF_HOME``, else ``~/.local/share/neuromf``): runs, generated pairs and
    the remembered widget state live here, never in the working directory."""
    from neuromf.utils import default_output_root

    return default_output_root()


def attach_state() -> PluginState:
    """The shared state, read from the user data folder on first use."""
    STATE.attach(user_folder() / "napari_state.json")
    return STATE
