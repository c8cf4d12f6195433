"""Imported first by every tool: a source checkout works without installing steel_fsd, and Detectron2
v0.6's import-time use of the deprecated ``torch.jit.script`` does not print warnings at users."""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
ROOT = Path(__file__).resolve().parents[1]
try:
    import steel_fsd  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
