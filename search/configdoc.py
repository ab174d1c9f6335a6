"""What each config key means, read from the config types' own comments, and the resolved config printed with them
(`kdsearch config PRESET|FILE [--set KEY=VALUE ...]`), and the default config so printed as docs/configuration.md
(`python -m search.configdoc > docs/configuration.md`).

A key's meaning is the comment on its field's line in kd/config.py or search/config.py, or the comment lines just
above it; tests/test_config.py checks that every key has one, so a new setting cannot ship without its meaning.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

import yaml

FIELD = re.compile(r"^    (\w+):")


def _comments(cls: type) -> dict[str, str]:
    """field -> its comment, for the fields `cls` itself declares (a comment above a field, then the one beside it)."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = FIELD.match(line)
        if match and not stripped.startswith(("def ", "@")):
            beside = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            text = " ".join(part for part in (" ".join(above), beside) if part)
            if text:
                out[match.group(1)] = text
        above = []
    return out


def meanings(cls: type, prefix: str = "") -> dict[str, str]:
    """Every key of the config type `cls` (dotted, as --set names it) with its meaning ("" where it has none); a
    field that is itself a section is listed with its own keys."""
    declared: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(base):
            declared.update(_comments(base))
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section = _section(hints[f.name])
        out[key] = declared.get(f.name, "")
        if section is not None:
            out.update(meanings(section, f"{key}."))
    return out


def _section(hint: Any) -> type | None:
    """The dataclass a field holds (also as `X | None`), or None."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def annotated_yaml(cfg: Any, header: str = "") -> str:
    """The config as YAML, a section a block and each key on a line of its own with its meaning as a comment (it
    loads back to the same config)."""
    known = meanings(type(cfg))
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    _emit(cfg.to_dict(), "", 0, known, out)
    return "\n".join(out) + "\n"


def _emit(section: dict[str, Any], prefix: str, indent: int, known: dict[str, str], out: list[str]) -> None:
    pad = " " * indent
    for name, value in section.items():
        key = f"{prefix}{name}"
        meaning = known.get(key, "")
        nested = isinstance(value, dict) and any(k.startswith(f"{key}.") for k in known)
        if nested:  # a section of the config: its keys below it
            out.append(_commented(f"{pad}{name}:", meaning))
            _emit(value, f"{key}.", indent + 2, known, out)
        elif isinstance(value, (dict, list)) and value and len(_flow(value)) > 60:  # the space, the points: a block
            out.append(_commented(f"{pad}{name}:", meaning))
            block = yaml.safe_dump(value, sort_keys=False, default_flow_style=None, width=100)
            out += [f"{pad}  {line}" for line in block.splitlines()]
        else:
            out.append(_commented(f"{pad}{name}: {_flow(value)}", meaning))


def _flow(value: Any) -> str:
    """A value on one line of YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _commented(line: str, meaning: str) -> str:
    return f"{line:<40}  # {meaning}" if meaning else line


def reference() -> str:
    """docs/configuration.md: every key of a search's config with its default and its meaning, as Markdown
    (tests/test_config.py checks the file is this, so a key or a meaning changed without regenerating fails)."""
    from search.config import load_config

    return (
        "# Configuration reference\n\n"
        "Every key of a search's config, with its default and its meaning (the comment on its field in `kd/config.py`\n"
        "or `search/config.py`). Generated from those config types by `search/configdoc.py`: do not edit it by hand,\n"
        "regenerate it with\n\n"
        "```bash\npython -m search.configdoc > docs/configuration.md\n```\n\n"
        "`kdsearch config PRESET|FILE [--set KEY=VALUE ...]` prints the same for a preset or a config of your own,\n"
        "resolved; the conventions behind the keys are in [getting-started.md](getting-started.md#configuration).\n\n"
        "```yaml\n" + annotated_yaml(load_config(None)) + "```\n"
    )


if __name__ == "__main__":
    print(reference(), end="")
