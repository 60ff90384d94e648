"""`LoopClient`: the paho-mqtt client with what we change in it, and `correlated` PUBLISH properties.

Three private hooks of paho 2.x are overridden (pinned below 3; `test_pahoio` fails if they move): the
socket of a connect is the one `pahoio.Driver` opened (`_create_socket`); a plain PUBACK skips paho's
decoder (`_handle_pubackcomp`); an inbound v5 PUBLISH's properties are screened before paho decodes them
(`_handle_publish`, see `packets`). Streamed chunks of one request share packed correlation properties.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from worker.transport.packets import screen_publish

_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
# A plain PUBACK after its packet id: nothing (3.1.1, or v5 success: MQTT 5 section 3.4.2.1), or a success
# reason code, alone or with an empty property list (Mosquitto sends these; 0x10 when nobody subscribes).
_OK = ReasonCode(PacketTypes.PUBACK, identifier=0x00)
_NOBODY = ReasonCode(PacketTypes.PUBACK, identifier=0x10)  # "No matching subscribers": a success too
_PLAIN_PUBACKS = {b"": _OK, b"\x00": _OK, b"\x00\x00": _OK, b"\x10": _NOBODY, b"\x10\x00": _NOBODY}


class LoopClient(mqtt.Client):
    """A paho client whose next socket is opened by `Driver.open`, with two per-packet costs removed."""

    adopted: Any = None  # the socket `Driver.open` opened for the next connect (a `pahoio.Buffered`)
    violation: str | None = None

    def _create_socket(self) -> Any:  # noqa: ANN401 - paho 2.x: reconnect() takes its socket from here
        sock, self.adopted = self.adopted, None
        if sock is None:  # a reconnect we did not prepare (we set reconnect_on_failure=False): refuse it
            raise ConnectionRefusedError("no socket was opened for this connect")
        return sock

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:  # noqa: ANN401
        """Handle a plain PUBACK (reason: success, no properties) without paho's decoder.

        The decoder builds a ReasonCode and a Properties per packet: 24 us, a tenth of the front-end's CPU
        per streamed token.
        """
        packet = self._in_packet["packet"]
        reason = _PLAIN_PUBACKS.get(bytes(packet[2:])) if cmd == "PUBACK" else None
        if reason is None:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        """Screen a v5 PUBLISH's properties (`packets.screen_publish`) before paho decodes them.

        `violation` holds what the packet broke while paho's `on_message` runs for it (synchronously,
        inside this call), so the bus can attach it to the message.
        """
        if self._protocol == mqtt.MQTTv5:
            screened = screen_publish(self._in_packet["command"], self._in_packet["packet"])
            self._in_packet["packet"] = screened.packet
            self.violation = screened.violation
        try:
            return super()._handle_publish()
        finally:
            self.violation = None

    def _easy_log(self, level: Any, fmt: str, *args: Any) -> None:  # noqa: ANN401
        if level != mqtt.MQTT_LOG_DEBUG:  # paho logs a DEBUG line per packet; keep its warnings and errors
            super()._easy_log(level, fmt, *args)


class _Correlated(Properties):
    """PUBLISH properties carrying CorrelationData only, packed once.

    A streamed reply publishes the same ones with every chunk; paho builds (20 us) and packs (16 us) them
    each time.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self.CorrelationData = data
        # (Properties refuses attribute names it does not know)
        object.__setattr__(self, "_packed", super().pack())  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        """The bytes packed at construction."""
        packed: bytes = self.__dict__["_packed"]
        return packed


_CORRELATED: dict[bytes, Properties] = {}
CORRELATED_CACHE = 1024
CORRELATED_CACHE_BYTES = 256 * 1024
_correlated_bytes = 0


def correlated(data: bytes) -> Properties:
    """PUBLISH properties with this correlation data (cached: the same request's chunks share them).

    Bounded in entries and in bytes (each entry holds its data twice: the key and the packed copy).
    """
    global _correlated_bytes  # noqa: PLW0603 - one process-wide cache
    props = _CORRELATED.get(data)
    if props is None:
        if len(_CORRELATED) >= CORRELATED_CACHE or _correlated_bytes + 2 * len(data) > CORRELATED_CACHE_BYTES:
            _CORRELATED.clear()
            _correlated_bytes = 0
        props = _CORRELATED[data] = _Correlated(data)
        _correlated_bytes += 2 * len(data)
    return props
