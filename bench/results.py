"""Where a CPU bench's JSON document goes (bench/decode_cpu.py, bench/engine_cpu.py): `--json -` prints it,
any other value is the file to write."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(doc: dict, dest: str, log, what: str, default=None) -> None:
    """doc as indented JSON to stdout when dest is "-", else to the file dest, which `log` then names
    ("{what} written to {dest}"). default: json.dumps' fallback for values it cannot encode."""
    text = json.dumps(doc, indent=2, default=default)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
        log(f"{what} written to {dest}")
