"""The `helpers` fixture: tests/support.py, for pass tests of branches written before it existed.

New tests import what they need from ``support`` directly.
"""

from __future__ import annotations

import types

import pytest
import support


@pytest.fixture
def helpers() -> types.ModuleType:
    return support
