"""What every benchmark script puts at the top of its JSON, and how it writes the file.

Scripts import it as a sibling module (``from results_json import ...``): run as
``python benchmarks/NAME.py``, their own folder is first on ``sys.path``, and the name
``benchmarks`` itself belongs to a package installed in the environment.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def header(name: str) -> dict[str, Any]:
    """``benchmark``, ``command`` (``python benchmarks/<name>.py`` and this process's
    arguments) and ``machine`` (CPU count, Python version) of a results file."""
    return {
        "benchmark": name,
        "command": f"python benchmarks/{name}.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
