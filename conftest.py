"""Root pytest config: notebooks collected by nbval read tests/params/nbval.yaml (run 'nbval')."""
import os
from pathlib import Path


def pytest_configure(config):
    os.environ.setdefault("LLAVA_GGUF_PARAMS", str(Path(__file__).parent / "tests" / "params" / "nbval.yaml"))
