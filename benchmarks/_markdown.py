"""Results files made of `## title` sections: a rerun replaces its own section, others stay."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, title: str, section: str, header: str) -> None:
    """Replace the ``## title`` section of ``path`` (append it if new; start the file with ``header``).

    ``section`` must begin with the line ``## title``. The file is replaced atomically.
    """
    if not section.startswith(f"## {title}\n"):
        raise ValueError(f"section does not start with '## {title}'")
    text = path.read_text() if path.exists() else header
    parts = re.split(r"(?m)^(?=## )", text)
    index = next((i for i, part in enumerate(parts) if part.startswith(f"## {title}\n")), None)
    if index is None:
        parts.append(("\n" if not parts[-1].endswith("\n\n") else "") + section.rstrip("\n") + "\n\n")
    else:
        parts[index] = section.rstrip("\n") + "\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(parts).rstrip("\n") + "\n")
    tmp.replace(path)
