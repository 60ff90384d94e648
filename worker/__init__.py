"""vllm-worker: serve LLM answers from an in-process vLLM engine over MQTT."""

__version__ = "0.1.0"
