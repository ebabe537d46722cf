"""Sections of bench/RESULTS.md that a script owns between two marker lines (its own measurement).

``report.py`` rewrites the file and keeps every section listed in ``OWNED``; each script that writes one
(``host_overhead.py --write``, ``cheap_steps.py --write``) replaces only its own.
"""

from __future__ import annotations

import re
from pathlib import Path

HOST_OVERHEAD = "<!-- host-overhead -->"
CHEAP_STEPS = "<!-- cheap-steps -->"
FUSED_BASE_STEP = "<!-- fused-base-step -->"
OWNED = (HOST_OVERHEAD, CHEAP_STEPS, FUSED_BASE_STEP)


def _pattern(marker: str) -> str:
    return re.escape(marker) + r".*?" + re.escape(marker)


def write_section(path: Path, marker: str, title: str, text: str) -> None:
    """Put ``text`` under ``## title`` between ``marker`` lines in ``path``, replacing that section if present."""
    block = f"{marker}\n## {title}\n\n{text}\n{marker}"
    current = path.read_text() if path.exists() else ""
    if marker in current:
        current = re.sub(_pattern(marker), lambda _: block, current, flags=re.S)
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def kept_sections(previous: str) -> list[str]:
    """The owned sections found in a previous RESULTS.md, in ``OWNED`` order."""
    return [match.group(0) for marker in OWNED if (match := re.search(_pattern(marker), previous, flags=re.S))]
