"""Serving benchmark: plain vLLM server vs FastChat worker vs OpenAI front, same
traffic (vLLM's ``vllm.benchmarks.serve``). The code lives in
``qwen_vllm/bench_serving.py``; this is ``qwen-vllm bench versus --only serving``.

    python scripts/bench_serving.py                              # tiny random fixture
    python scripts/bench_serving.py --size 1.8B --concurrency 1 8 --rounds 3
"""

import sys

from qwen_vllm.bench_serving import main

if __name__ == "__main__":
    sys.exit(main())
