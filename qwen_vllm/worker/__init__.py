"""The FastChat worker: FastChat's protocol on vLLM (``protocol``), its routes
as a vLLM endpoint plugin (``routes``), request checks in front of vLLM's
OpenAI routes, and the link to the FastChat controller (``registration``).
``qwen_vllm.worker_launch`` starts it."""
