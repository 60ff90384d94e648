"""Ask a vllm-worker project from a MicroPython board (ESP32, Pico W) over MQTT, with umqtt.simple.

Copy this file and umqtt/simple.py to the board (`mpremote mip install umqtt.simple`), join Wi-Fi in
boot.py, set BROKER below, then `import ask; ask.main()`. Classic protocol: the request is JSON on
`{project}/user_input`, the answer is plain text on `{project}/assistant_response/{sessionId}`, and an
answer starting "Error: " is a refusal (examples/README.md lists every wire fact).

The same file runs unchanged under CPython (`python ask.py HOST PORT MESSAGE`, see README.md here).
"""

import sys

import ujson
import utime
from umqtt.simple import MQTTClient

BROKER = "192.168.1.10"  # the Mosquitto host (deploy/: app listener 1883)
PORT = 1883
USER = None  # with deploy/'s ACL: an app account, e.g. "app"
PASSWORD = None
PROJECT = "maze"
SESSION = "robot-1"  # the conversation: the worker keeps its history
TIMEOUT_MS = 30000
ERROR_PREFIX = "Error: "


class AskError(Exception):
    """The worker refused the request: the text after "Error: " says why (e.g. rate limited)."""


class Asker:
    """One MQTT connection; `ask` sends a message and waits for its answer, reconnecting once if needed."""

    def __init__(self, broker=BROKER, port=PORT, project=PROJECT, session=SESSION, user=USER, password=PASSWORD):
        self.broker, self.port, self.user, self.password = broker, port, user, password
        self.session = session
        self.request_topic = (project + "/user_input").encode()
        self.reply_topic = (project + "/assistant_response/" + session).encode()
        self.client = None
        self.answer = None

    def connect(self):
        client_id = "mp-" + self.session + "-" + str(utime.ticks_ms())
        self.client = MQTTClient(client_id, self.broker, self.port, self.user, self.password, keepalive=60)
        self.client.set_callback(self._on_message)
        self.client.connect()
        self.client.subscribe(self.reply_topic, qos=1)

    def close(self):
        if self.client is not None:
            try:
                self.client.disconnect()
            except Exception:  # noqa: BLE001 - the link is already gone
                pass
        self.client = None

    def _on_message(self, topic, msg):
        self.answer = msg

    def ask(self, message, timeout_ms=TIMEOUT_MS):
        """The answer text, or None after timeout_ms; raises AskError on an "Error: " reply."""
        # bytes, not str: umqtt sizes packets with len(), which counts characters in a str
        body = ujson.dumps({"message": message, "sessionId": self.session}).encode()
        for attempt in range(2):
            try:
                if self.client is None:
                    self.connect()
                self.answer = None
                self.client.publish(self.request_topic, body, qos=1)
                return self._wait(timeout_ms)
            except (OSError, IndexError):  # broker restarted or Wi-Fi dropped: reconnect once
                self.close()
                if attempt:
                    raise
                utime.sleep_ms(500)
        return None

    def _wait(self, timeout_ms):
        started = utime.ticks_ms()
        while self.answer is None:
            self.client.check_msg()
            if utime.ticks_diff(utime.ticks_ms(), started) > timeout_ms:
                return None
            utime.sleep_ms(10)
        text = self.answer.decode()
        if text.startswith(ERROR_PREFIX):
            raise AskError(text[len(ERROR_PREFIX) :])
        return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    broker = argv[0] if len(argv) > 0 else BROKER
    port = int(argv[1]) if len(argv) > 1 else PORT
    message = argv[2] if len(argv) > 2 else "Which way to the exit?"
    asker = Asker(broker, port)
    try:
        answer = asker.ask(message)
    except AskError as err:
        print("refused:", err)
        return 1
    finally:
        asker.close()
    if answer is None:
        print("no answer within", TIMEOUT_MS, "ms")
        return 2
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
