"""CPython stand-in for MicroPython's `usocket` (test shim only; a board has the real one).

MicroPython sockets are streams with `read(n)` / `write(buf, n)`; a non-blocking `read` with nothing to
read returns None. This wraps CPython's socket to behave the same; nothing else differs.
"""

import socket as _socket

getaddrinfo = _socket.getaddrinfo


class socket(_socket.socket):
    def write(self, buf, n=None):
        if isinstance(buf, str):  # MicroPython writes a str as UTF-8
            buf = buf.encode()
        data = bytes(buf if n is None else memoryview(buf)[:n])
        self.sendall(data)
        return len(data)

    def read(self, n):
        out = b""
        while len(out) < n:
            try:
                chunk = self.recv(n - len(out))
            except BlockingIOError:
                return out or None
            if not chunk:
                return out
            out += chunk
        return out
