"""Drop-in adapters for MoE runtimes: :mod:`eplb_triton.integrations.vllm` and
:mod:`eplb_triton.integrations.sglang`.

Importing them never imports the runtime: each works (and is tested) without vLLM or SGLang
installed, and ``install()`` imports the runtime only when called.
"""

from __future__ import annotations

__all__ = ["sglang", "vllm"]
