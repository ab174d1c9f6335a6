"""The JSON records the library writes: one frozen dataclass per record, used by its writer and its readers.

An export's kdsearch.json (kd.export.ExportMetadata), `kdsearch distill`'s metrics.json (kd.distill.DistillMetrics),
`kdsearch evaluate`'s metrics.json (kd.evaluate.EvaluationRecord) and the teacher cache's teacher.json
(kd.teacher.TeacherMeta) are each written from their dataclass (`to_dict`, `write`) and read back through it
(`from_dict`, `read`) with kd.typed: every key checked against the fields, every value coerced to its type, so a
field renamed on one side fails at once, in mypy and at the first read, naming the file and the key, instead of a
`.get` quietly finding nothing. An earlier version's field names map to this version's in `RENAMED`; any other
earlier layout is turned into this one by `upgraded(raw)`. (search.records holds the run directory's records, on
the same rules.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kd.errors import ConfigError, UserError
from kd.files import atomic_write_json, read_json
from kd.typed import build

R = TypeVar("R", bound="JsonRecord")


@dataclass(frozen=True)
class JsonRecord:
    """A record kept as a JSON object."""
    RENAMED: ClassVar[dict[str, str]] = {}  # an earlier version's field name -> this version's (still read)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def upgraded(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """An earlier version's fields as this version's (beyond a rename: `RENAMED`)."""
        return raw

    @classmethod
    def from_dict(cls: type[R], raw: dict[str, Any], source: str) -> R:
        """The record from its JSON, read at `source` (named by any error): a key that is not a field, a missing
        field or a value of the wrong type is a UserError naming `source` and the field."""
        raw = cls.upgraded({cls.RENAMED.get(k, k): v for k, v in raw.items()})
        try:
            record: R = build(cls, raw, "", source)
        except TypeError as e:  # a required field missing
            raise UserError(f"{source}: not a {cls.__name__} record ({e})") from None
        except ConfigError as e:
            raise UserError(str(e).replace("unknown key", "unknown field")) from None
        return record

    @classmethod
    def read(cls: type[R], path: str | Path) -> R | None:
        """The record in `path`, or None where the file does not exist (or cannot be parsed: cut short by a kill);
        a file whose fields are not this record's is a UserError naming the file and the field."""
        raw = read_json(path)
        return None if raw is None else cls.from_dict(raw, str(path))
