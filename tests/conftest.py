"""Shared test settings."""

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("default")


@pytest.fixture(scope="session", autouse=True)
def _node_bytecode() -> None:
    """Tests that start ``irisnode`` processes should time what a user's start costs.

    Where PYTHONDONTWRITEBYTECODE is set, each start would compile our modules anew.
    """
    from bench.relay_node import compile_node

    compile_node()
