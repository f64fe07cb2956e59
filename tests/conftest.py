"""Session-wide fixtures. Each module in tests/servers/ starts one real local server (once per
test session) and is loaded here as a pytest plugin."""

import pkgutil
from pathlib import Path

pytest_plugins = [
    f"tests.servers.{module.name}"
    for module in pkgutil.iter_modules([str(Path(__file__).parent / "servers")])
]
