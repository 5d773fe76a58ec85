"""``[sources.NAME]`` with ``type = "drop_folder"``: a directory the MES drops files into."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from adapters.sources.mes_common import FieldMapping
from agent.config import ByteSize, Duration, Model, SourceConfig, parse_bytes

if TYPE_CHECKING:
    from agent.preflight import Check


class CsvOptions(Model):
    """How CSV files are read. Each row becomes an object keyed by the header's column
    names, mapped like a JSON line: name columns after canonical fields ("type", "time",
    "data.work_order", "data.good.uom") or rename them in ``mapping.fields``."""

    delimiter: str = ","

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, v: str) -> str:
        if len(v) != 1 or v in '\r\n"':
            raise ValueError('must be one character such as "," ";" or "\\t"')
        return v


class Config(SourceConfig):
    type: Literal["drop_folder"] = "drop_folder"
    #: the directory to watch (files are read from it, not from below it)
    path: Path
    #: where imported files go; relative paths are below ``path``
    processed_dir: Path = Path("processed")
    #: where refused files go, each with NAME.errors.txt beside it
    rejected_dir: Path = Path("rejected")
    #: file name patterns (case-insensitive) and what they contain
    patterns: list[str] = ["*.jsonl", "*.csv"]
    #: how often the directory is listed; a file is read once it is unchanged for one interval
    poll_interval: Duration = Field(default=2.0, gt=0)
    #: larger files are rejected with a report. A file is imported in one transaction, so
    #: it is held in memory: peak memory is roughly 30x the file size (see README)
    max_file_size: ByteSize = parse_bytes("8MiB")
    #: the MES's own field names -> canonical fields; a fixed event type for every row is
    #: ``mapping.constants.type`` (see adapters/sources/mes_common)
    mapping: FieldMapping = FieldMapping()
    #: UN/CEFACT unit codes this site uses beyond the built-in list
    extra_uom_codes: list[str] = []
    csv: CsvOptions = CsvOptions()

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError('list at least one pattern, e.g. ["*.jsonl", "*.csv"]')
        for p in v:
            if not p.lower().endswith((".jsonl", ".ndjson", ".csv")):
                raise ValueError(f"'{p}' must end in .jsonl or .ndjson (JSON Lines) or .csv")
        return v

    @field_validator("max_file_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1 byte (e.g. 64MiB)")
        return v

    @model_validator(mode="after")
    def _dirs(self) -> Config:
        for key in ("processed_dir", "rejected_dir"):
            d = self.dir(key)
            if d.resolve() == self.path.resolve():
                raise ValueError(f"{key} must differ from path (use e.g. '{key[:-4]}')")
        if self.dir("processed_dir").resolve() == self.dir("rejected_dir").resolve():
            raise ValueError("processed_dir and rejected_dir must differ")
        return self

    def preflight(self, check: Check) -> None:
        """The watched directory must exist (the MES writes into it); processed/ and
        rejected/ are created when missing, so they must be creatable."""
        if check.directory("path", self.path, writable=True):
            for key in ("processed_dir", "rejected_dir"):
                check.creatable_directory(key, self.dir(key))

    def dir(self, key: str) -> Path:
        d: Path = getattr(self, key)
        return d if d.is_absolute() else self.path / d
