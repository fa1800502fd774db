"""The CI policy itself: with OVA2IMG_NO_SKIP=1 a skipped test counts as a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def test_a_skip_is_fatal_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile("import pytest\ndef test_x():\n    pytest.skip('no tool')\n")
    monkeypatch.setenv("OVA2IMG_NO_SKIP", "1")
    pytester.runpytest_subprocess().assert_outcomes(failed=1)
    monkeypatch.setenv("OVA2IMG_NO_SKIP", "0")
    pytester.runpytest_subprocess().assert_outcomes(skipped=1)
