"""A TLS front for a plain Redis, for `rediss://` tests: the `redis-server` shipped in the wheel is
built without TLS. Clients speak real TLS to the proxy (certificates from `trustme`), which
forwards the bytes to Redis; `handshakes` counts the TLS sessions it accepted."""

from __future__ import annotations

import asyncio
import ssl
import threading

from ops.redis_server import HOST, free_port


class TLSProxy:
    def __init__(self, target_port: int, context: ssl.SSLContext):
        self.target_port = target_port
        self.context = context
        self.port = free_port()
        self.handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TLSProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS proxy did not start")
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._serve, HOST, self.port, ssl=self.context))
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, client_reader, client_writer) -> None:
        self.handshakes += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, RuntimeError):
            pass
