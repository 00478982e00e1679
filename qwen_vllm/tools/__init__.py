"""Qwen's ReAct function calling: OpenAI tools and legacy ``functions`` ->
Qwen's prompt, replies -> ``tool_calls``; the ``qwen_react`` vLLM tool parser."""
