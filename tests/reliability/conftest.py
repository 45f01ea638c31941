"""Fixtures of the reliability matrix: namespaces that live for one test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from reliability_support import Namespaces


@pytest.fixture(scope="module")
def module_netns() -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    made = Namespaces()
    try:
        yield made
    finally:
        made.remove()
