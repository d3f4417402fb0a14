"""Run Prefect with no server, no network and nothing written to the user's home.

Must run before the first `import prefect`: Prefect reads these settings at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # cold start (SQLite migrations) takes 13-16 s here
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # telemetry would try DNS and log errors offline
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}


def configure(home: str | Path | None = None) -> Path:
    """Point PREFECT_HOME at `home` (default: $RECONLAB_HOME/prefect, RECONLAB_HOME defaulting to ./.reconlab)."""
    if "PREFECT_HOME" not in os.environ:
        base = Path(os.environ.get("RECONLAB_HOME", ".reconlab"))
        os.environ["PREFECT_HOME"] = str((Path(home) if home else base / "prefect").resolve())
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return Path(os.environ["PREFECT_HOME"])
