"""A simulated maze robot that serves two device tools to a vllm-worker over MQTT: `look` and `move`.

It announces its tools with a retained message on `maze/capabilities/{ROBOT_ID}`, takes calls on
`maze/tools/{ROBOT_ID}/{tool}` and answers each on the call's `replyTopic` with `{"callId", "content"}`
(docs/protocol.md section 3b). A call it has already answered (the same callId, e.g. a redelivered
request) gets the same answer again and the robot does not move twice.

On a board: copy this file and umqtt/simple.py, set BROKER, `import robot; robot.main()`. Under CPython:
`PYTHONPATH=shim:. python robot.py HOST PORT [ROBOT_ID] [SECONDS]` (see README.md here).
"""

import sys

import ujson
import utime
from umqtt.simple import MQTTClient

BROKER = "192.168.1.10"
PORT = 1883
USER = None  # with deploy/'s ACL: the robot's own account (its username is its ROBOT_ID)
PASSWORD = None
PROJECT = "maze"
ROBOT_ID = "robot-1"
REMEMBERED_CALLS = 64

MAZE = (
    "#########",
    "#S  #   #",
    "# # # # #",
    "# #   #E#",
    "#########",
)
STEPS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
DIRECTION = {"type": "string", "enum": ["north", "south", "east", "west"]}
TOOLS = [
    {
        "name": "look",
        "description": "Look one cell in a direction: wall, open or exit.",
        "parameters": {"type": "object", "properties": {"direction": DIRECTION}, "required": ["direction"]},
        "timeoutMs": 2000,
    },
    {
        "name": "move",
        "description": "Move up to `steps` cells in a direction; stops at a wall.",
        "parameters": {
            "type": "object",
            "properties": {"direction": DIRECTION, "steps": {"type": "integer", "minimum": 1, "maximum": 3}},
            "required": ["direction"],
        },
        "timeoutMs": 2000,
    },
]


class Robot:
    """The robot's state in the maze and its two tools."""

    def __init__(self):
        self.row, self.col = 1, 1
        self.moves = 0

    def cell(self, direction):
        d_row, d_col = STEPS[direction]
        return MAZE[self.row + d_row][self.col + d_col]

    def look(self, args):
        seen = self.cell(args["direction"])
        return {"direction": args["direction"], "sees": {"#": "wall", "E": "exit"}.get(seen, "open")}

    def move(self, args):
        direction, moved = args["direction"], 0
        for _ in range(int(args.get("steps", 1))):
            if self.cell(direction) == "#":
                break
            d_row, d_col = STEPS[direction]
            self.row, self.col = self.row + d_row, self.col + d_col
            moved += 1
        self.moves += moved
        at_exit = MAZE[self.row][self.col] == "E"
        return {"moved": moved, "position": [self.row, self.col], "at_exit": at_exit}


class Device:
    """One MQTT connection serving the robot's tools."""

    def __init__(self, broker=BROKER, port=PORT, robot_id=ROBOT_ID, user=USER, password=PASSWORD):
        self.robot = Robot()
        self.robot_id = robot_id
        self.answered = []  # (callId, answer) of recent calls: a repeated call is answered, not re-run
        self.client = MQTTClient("dev-" + robot_id, broker, port, user, password, keepalive=60)
        self.client.set_callback(self._on_call)

    def start(self):
        self.client.connect()
        self.client.subscribe((PROJECT + "/tools/" + self.robot_id + "/#").encode(), qos=1)
        announcement = ujson.dumps({"tools": TOOLS}).encode()
        self.client.publish((PROJECT + "/capabilities/" + self.robot_id).encode(), announcement, retain=True, qos=1)

    def _on_call(self, topic, msg):
        try:
            call = ujson.loads(msg)
            answer = self._answer(topic.decode().rsplit("/", 1)[-1], call)
            reply = ujson.dumps({"callId": call["callId"], "content": answer}).encode()
            self.client.publish(call["replyTopic"].encode(), reply, qos=1)
        except (ValueError, KeyError, TypeError) as err:  # a malformed call: nothing to answer to
            print("bad call:", err)

    def _answer(self, tool, call):
        for call_id, answer in self.answered:
            if call_id == call["callId"]:
                return answer
        handler = {"look": self.robot.look, "move": self.robot.move}.get(tool)
        answer = handler(call["arguments"]) if handler else {"error": "no tool " + tool}
        print("call", tool, ujson.dumps(call["arguments"]), "->", ujson.dumps(answer))
        self.answered.append((call["callId"], answer))
        del self.answered[:-REMEMBERED_CALLS]
        return answer

    def serve(self, seconds=None):
        started = utime.ticks_ms()
        while seconds is None or utime.ticks_diff(utime.ticks_ms(), started) < seconds * 1000:
            self.client.check_msg()
            utime.sleep_ms(10)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    broker = argv[0] if len(argv) > 0 else BROKER
    port = int(argv[1]) if len(argv) > 1 else PORT
    robot_id = argv[2] if len(argv) > 2 else ROBOT_ID
    seconds = float(argv[3]) if len(argv) > 3 else None
    device = Device(broker, port, robot_id)
    device.start()
    print("robot", robot_id, "serving look and move on", broker, port)
    device.serve(seconds)
    print("robot at", [device.robot.row, device.robot.col], "after", device.robot.moves, "moves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
