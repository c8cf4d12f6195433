"""Lets the tools run from a source checkout without installing steel_fsd."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import steel_fsd  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
