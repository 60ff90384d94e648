"""A faithful re-implementation of the old one-file script's design, for side-by-side benchmarks only.

The old script received MQTT messages in paho's callback, handed each to a thread pool, and every pool
thread called the synchronous `LLM.generate([prompt])` for its one request. Concurrent `generate` calls
from threads are unsupported by vLLM's `LLM`, so they are serialised (a lock): one request at a time,
no continuous batching. Replies are classic plain text on `{project}/assistant_response/{sessionId}`.

    python benchmarks/legacy_worker.py --port 1883 --model models/smollm2-135m-instruct [--ignore-eos]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--project", default="general")
    p.add_argument("--ignore-eos", action="store_true")
    args = p.parse_args()

    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    llm = LLM(model=args.model, enforce_eager=True, max_model_len=2048)
    tokenizer = llm.get_tokenizer()
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=8)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="legacy-worker", protocol=mqtt.MQTTv311)
    client.on_socket_open = lambda _c, _u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(payload: bytes) -> None:
        body = json.loads(payload)
        chat = [*body.get("history", []), {"role": "user", "content": body["message"]}]
        prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        params = SamplingParams(temperature=0, max_tokens=int(body.get("maxTokens", 64)), ignore_eos=args.ignore_eos)
        with lock:  # LLM.generate is not safe to call concurrently: one request at a time
            out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        topic = f"{args.project}/assistant_response/{body['sessionId']}"
        client.publish(topic, out.text.strip().encode(), qos=1)  # classic: plain text

    client.on_message = lambda _c, _u, msg: pool.submit(handle, msg.payload)
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(f"{args.project}/user_input", qos=1)
    client.connect("127.0.0.1", args.port)
    print("READY", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
