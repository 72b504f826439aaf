"""A `vlmrt serve` server for tests: on a free loopback port, answering from a thread."""

import base64
import contextlib
import threading


@contextlib.contextmanager
def running(pipe, max_batch: int = 32, **options):
    """A server on a free port, answering from a thread (`options`: ServeOptions fields)."""
    from vlmrt.serve import ServeOptions, make_server  # the serve extra: importorskip'd by the test files

    server = make_server(pipe, "127.0.0.1", 0, ServeOptions(quiet=True, **options), max_batch)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def data_url(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
