"""``qwen-vllm bench``: the report and its commands (``report``), one
measurement job per process (``engine``), and the serving comparison (``serving``)."""
