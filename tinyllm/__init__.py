"""tinyllm: a small, readable LLaMA-family inference runtime (numpy reference + CUDA)."""

from .api import LLM
from .engine import Completion
from .errors import TinyLLMError
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion", "TinyLLMError"]
__version__ = "0.1.0"
