"""kanana-quant: quantize Kakao's Kanana LLMs and run them offline on a CPU."""

from kanana_quant.errors import KananaQuantError

__version__ = "0.1.0"
__all__ = ["KananaQuantError", "__version__"]
