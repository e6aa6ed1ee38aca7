"""File descriptions shared by the spec (inputs, outputs) and the status (stored files)."""

from __future__ import annotations

from enum import StrEnum

from dsjobs.models.base import CRModel, field, optional_pattern
from dsjobs.models.limits import MAX_PATH_LENGTH, NO_CONTROL_CHARS_PATTERN, SHA256_PATTERN, VAR_PATTERN


class CompressionType(StrEnum):
    """How a file is packed (proto FileCompressionType; UNSPECIFIED is read as NONE)."""

    NONE = "NONE"
    ZIP = "ZIP"


class FileDesc(CRModel):
    """A file as the job's config names it (proto FileDesc)."""

    path: str = field(
        "Path as written in the job config. Without `var` it is where the file lives, relative to the "
        "job's working directory (relative, no `..` segment). With `var` it may be any path (absolute, "
        "with `..`, Windows-style): a safe relative one is still where the file lives, another places it "
        "at `.dsjobs-vars/<var>/<its last segment>` (`<var>` for a last segment it cannot use, as `..`); "
        "the job refers to it as `${var}`.",
        maxLength=MAX_PATH_LENGTH,
        minLength=1,
        pattern=NO_CONTROL_CHARS_PATTERN,
    )
    var: str = field(
        "Variable name that `cmd` uses as `${var}` to refer to this file; empty for none.",
        "",
        maxLength=50,
        pattern=optional_pattern(VAR_PATTERN),
    )


class File(CRModel):
    """A file with its content hash (proto File): job inputs and Python local modules."""

    desc: FileDesc = field("Path and variable of the file.")
    sha256: str = field(
        "SHA-256 of the (possibly zipped) content, 64 lowercase hex digits. Inputs are stored in the "
        "project's content-addressed cache under this hash.",
        pattern=SHA256_PATTERN,
        maxLength=64,
    )
    size_bytes: int = field("Size of the (possibly zipped) content in bytes.", 0, minimum=0)
    compression_type: CompressionType = field(
        "NONE for a plain file, ZIP for a zipped directory or local module (unpacked before the job runs).",
        CompressionType.NONE,
    )
