"""How the bus builds its paho client: options, credentials, Last Will, TLS (one place for paho's knobs).

Manual acks (a request counts as taken only when the worker says so), no paho reconnects (the bus owns
them), callback exceptions logged and swallowed (one raising callback must not end the connection).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from worker.config import BrokerConfig
from worker.transport.pahoclient import LoopClient


@dataclass(frozen=True, slots=True)
class Will:
    """Last Will: published by the broker if this client dies without a clean disconnect."""

    topic: str
    payload: bytes
    retain: bool = True


def make_client(cfg: BrokerConfig, client_id: str, version: str, *, persistent: bool, will: Will | None) -> LoopClient:
    """A paho client for one connection attempt with MQTT `version` ("5" or "3.1.1"); callbacks are the bus's."""
    v5 = version == "5"
    client = LoopClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=True,
        reconnect_on_failure=False,  # reconnects are the bus's (_keep_connected), never paho's own
    )
    client.suppress_exceptions = True
    client.enable_logger(logging.getLogger("paho"))  # swallowed callback errors still get logged
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(cfg.max_queued_replies)
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.secret())
    if will is not None:
        client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
    return client


def tls_context(cfg: BrokerConfig) -> ssl.SSLContext | None:
    """The TLS context of an `mqtts://` endpoint (CA file, client certificate), else None."""
    if not cfg.endpoint()[2]:
        return None
    context = ssl.create_default_context(cafile=cfg.ca_file)
    if cfg.cert_file:
        context.load_cert_chain(cfg.cert_file, cfg.key_file)
    return context
