"""Fixtures shared by the operator's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_lease_api import FakeLeaseAPI


@pytest.fixture
async def api() -> AsyncIterator[FakeLeaseAPI]:
    server = FakeLeaseAPI()
    await server.start()
    yield server
    await server.stop()
