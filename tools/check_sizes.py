"""Fail on any module of src/lmprobe over 700 lines or class over 400 (``make lint``).

python tools/check_sizes.py [ROOT]   # ROOT: src/lmprobe
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 400


def oversized(root: Path) -> list[str]:
    """One line per module or class over its limit, as ``path:line: what``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path}:1: module of {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    found.append(
                        f"{path}:{node.lineno}: class {node.name} of {size} lines "
                        f"(limit {MAX_CLASS_LINES})"
                    )
    return found


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "src" / "lmprobe"
    found = oversized(root)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
