"""Transport: MQTT bytes in and out (paho on the event loop, the bus, the embedded broker); knows no protocol."""
