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


def description(name: str) -> str:
    """A preset's description: the comment lines its file opens with, as one paragraph."""
    lines = []
    for line in (PRESETS / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def listing() -> str:
    """Each preset: its name, then its whole description, wrapped."""
    import textwrap
    return "\n\n".join(f"{name}\n" + textwrap.fill(description(name), 100, initial_indent="  ",
                                                     subsequent_indent="  ") for name in preset_names())
