"""A pytest plugin: in-process tests on the reactor the ``irisnode`` command runs on.

``pytest -p tests.production_reactor --reactor=default ...`` installs
:class:`irisnode.reactor.TurnReactor` before pytest-twisted installs its own (for
``default`` it accepts any epoll reactor already in place), so the relay's
end-of-turn flushing and the reactor's error isolation run under the tests exactly
as in production. ``tests/test_production_reactor.py`` runs the relay's end-to-end
tests this way; the rest of the suite runs on asyncio (``setup.cfg``).
"""

from __future__ import annotations

import pytest

from irisnode.reactor import TurnReactor, install_reactor

install_reactor()


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    from twisted.internet import reactor

    if not isinstance(reactor, TurnReactor):
        raise pytest.UsageError(f"expected irisnode's TurnReactor, got {type(reactor).__name__}")
