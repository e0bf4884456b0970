"""Quality of the engine's own KV path on a real model: perplexity of real text (perplexity.py) and
passkey retrieval (passkey.py), the text they read (text.py), and `kvtier eval` (cli.py).

Both run through `LLM.generate`, so whatever the engine settings change about the KV that attention
reads (a quantized tier, KCache's split, far blocks) is in what they measure."""

from kvtier.eval.passkey import PasskeyResult, passkey
from kvtier.eval.perplexity import PerplexityResult, perplexity

__all__ = ["perplexity", "PerplexityResult", "passkey", "PasskeyResult"]
