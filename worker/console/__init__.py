"""`vllm-worker console`: the lab console in a browser (fleet charts and a chat playground)."""
