"""What the ``irisnode`` command loads at start-up, and what it leaves for later.

``irisnode.cli.defer_imports`` puts ``ssl``, ``http.cookiejar`` and ``asyncio.sslproto``
behind ``importlib.util.LazyLoader``: the node never uses them, but anything that does
must get the real module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys
    from irisnode import cli
    cli.defer_imports(*cli.DEFERRED_MODULES)  # what cli.run does first; then it is a no-op
    from irisnode import node as node_module

    start = node_module.Node.start

    def start_then_use_ssl(self):
        start(self)

        def use_them():
            loaded = sorted(m for m in ("_ssl", "email", "urllib.request") if m in sys.modules)
            print("loaded before use:", loaded, flush=True)
            import ssl, http.cookiejar, asyncio.sslproto
            context = ssl.create_default_context()
            print("ssl:", type(context).__name__, context.verify_mode == ssl.CERT_REQUIRED, flush=True)
            print("cookiejar:", type(http.cookiejar.CookieJar()).__name__, flush=True)
            print("sslproto:", asyncio.sslproto.SSLProtocol.__name__, flush=True)
            self.reactor.stop()

        self.reactor.callLater(0, use_them)

    node_module.Node.start = start_then_use_ssl
    sys.exit(cli.main(["--relay-port", "0"]))
    """
)


def test_ssl_and_cookiejar_load_when_used_after_a_cli_start() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        "loaded before use: []",
        "ssl: SSLContext True",
        "cookiejar: CookieJar",
        "sslproto: SSLProtocol",
    ], done.stdout + done.stderr
