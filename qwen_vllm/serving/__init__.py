"""Serving processes: ``serve`` (vLLM's OpenAI server + Qwen), ``front`` (one
OpenAI endpoint over FastChat workers), ``stack`` (the whole topology in one
command), ``demo``, and the HTTP helpers they share."""
