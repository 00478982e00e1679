"""What runs inside every vLLM process: Qwen v1 config, model, tokenizer,
checkpoint checks, long context (NTK + LogN), quantization names and checks,
the CPU GPTQ kernel, the CPU LoRA ops and the default ChatML stops. ``qwen_vllm.register()``
imports only from here (plus ``chat_template``, ``stop_words`` and ``errors``)."""
