"""The presets shipped with the package: YAML configs named by file, including the reference projects' setups."""
from __future__ import annotations

import os
from importlib import resources

from kd.errors import UserError

PRESETS = resources.files(__name__)


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def is_preset(name: str) -> bool:
    return not os.path.exists(name) and name in preset_names()


def config_path(name: str) -> str:
    """A config file path, or the name of a preset shipped with the package."""
    if os.path.exists(name):
        return name
    preset = PRESETS / f"{name}.yaml"
    if preset.is_file():
        return str(preset)
    raise UserError(f"no config file or preset named '{name}' (presets: {', '.join(preset_names())})")


def listing() -> str:
    """One line per preset: its name and the first line of its file."""
    return "\n".join(f"{name:<26} {(PRESETS / f'{name}.yaml').read_text().splitlines()[0].lstrip('# ')}"
                     for name in preset_names())
