"""The built-in corpus: Jane Austen's six novels, read from Debian's `r-cran-janeaustenr`.

The package keeps them in an R lazy-load file (`data/Rdata.rdb`): a sequence of records, each a
4-byte big-endian length and a zlib stream holding an R XDR serialization of a character vector
(one element per line of the book). We parse just that: header, STRSXP, CHARSXP elements.
`$OWQ_AUSTEN_RDATA` names a copy of that file (the container images carry only the file, no R).
Knows nothing about models or quantization.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from functools import lru_cache
from pathlib import Path

RDATA = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
RDATA_ENV = "OWQ_AUSTEN_RDATA"
# where scripts/setup.sh puts the file when it takes it out of the package (no R installed)
ENV_RDATA = Path(sys.prefix) / "share" / "owq" / "janeaustenr" / "Rdata.rdb"
INSTALL_HINT = f"apt-get install r-cran-janeaustenr, or set {RDATA_ENV} to a copy of Rdata.rdb"
STRSXP, CHARSXP = 16, 9

# The title line each book's vector starts with -> our name for the novel.
TITLES = {
    "SENSE AND SENSIBILITY": "sense_and_sensibility",
    "PRIDE AND PREJUDICE": "pride_and_prejudice",
    "MANSFIELD PARK": "mansfield_park",
    "EMMA": "emma",
    "NORTHANGER ABBEY": "northanger_abbey",
    "PERSUASION": "persuasion",
}
HELD_OUT = "persuasion"


class CorpusMissing(FileNotFoundError):
    """The Austen corpus is not installed; the message says what to install."""


def _records(blob: bytes):
    pos = 0
    while pos + 4 <= len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        inflater = zlib.decompressobj()
        data = inflater.decompress(blob[pos + 4 :])
        if len(data) != length:
            raise ValueError(f"record at byte {pos}: expected {length} bytes, got {len(data)}")
        pos = len(blob) - len(inflater.unused_data)
        yield data


def _strings(data: bytes) -> list[str] | None:
    """The elements of a serialized character vector, or None if the record is something else."""
    if data[:2] != b"X\n":
        return None
    (version,) = struct.unpack(">i", data[2:6])
    pos = 14
    if version == 3:
        (enc_len,) = struct.unpack(">i", data[pos : pos + 4])
        pos += 4 + enc_len
    flags, count = struct.unpack(">ii", data[pos : pos + 8])
    if flags & 0xFF != STRSXP:
        return None
    pos += 8
    lines = []
    for _ in range(count):
        flags, length = struct.unpack(">ii", data[pos : pos + 8])
        pos += 8
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"expected CHARSXP at byte {pos - 8}, found type {flags & 0xFF}")
        if length < 0:  # NA_character_
            lines.append("")
            continue
        lines.append(data[pos : pos + length].decode("utf-8"))
        pos += length
    return lines


def rdata_path() -> Path:
    """$OWQ_AUSTEN_RDATA if set, else the copy in this Python environment if there is one, else
    where Debian's package installs the file."""
    if os.environ.get(RDATA_ENV):
        return Path(os.environ[RDATA_ENV])
    return ENV_RDATA if ENV_RDATA.is_file() else RDATA


def read_novels(path: Path | None = None) -> dict[str, str]:
    """{novel name: full text} for the six novels, in the order of TITLES."""
    return _read_novels(Path(path) if path is not None else rdata_path())


@lru_cache(maxsize=2)
def _read_novels(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CorpusMissing(f"the Austen corpus is not installed ({path} missing): {INSTALL_HINT}")
    found = {}
    for record in _records(path.read_bytes()):
        lines = _strings(record)
        if not lines:
            continue
        title = next((line.strip().upper() for line in lines if line.strip()), "")
        if title in TITLES:
            found[TITLES[title]] = "\n".join(lines)
    missing = sorted(set(TITLES.values()) - set(found))
    if missing:
        raise ValueError(f"{path}: novels not found: {', '.join(missing)}")
    return {name: found[name] for name in TITLES.values()}


def calibration_text() -> str:
    """The five training novels joined: the default calibration corpus."""
    novels = read_novels()
    return "\n\n".join(text for name, text in novels.items() if name != HELD_OUT)


def heldout_text() -> str:
    """Persuasion: the held-out evaluation text."""
    return read_novels()[HELD_OUT]
