"""Progress bars: drawn on a terminal, silent when piped, and off by huggingface_hub's switch."""

from __future__ import annotations

import io
import sys

import pytest
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)

from modelstore._runtime.progress import bar, counter


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture()
def bars_on():
    """Bars enabled for the test (another test's `modelstore eval` turns transformers' bars, and so
    huggingface_hub's, off process-wide), the previous state restored after."""
    was_off = are_progress_bars_disabled()
    enable_progress_bars()
    yield
    if was_off:
        disable_progress_bars()


def test_bars_draw_on_a_terminal_only_and_follow_the_hub_switch(monkeypatch, bars_on):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(bar(range(5), "work", enabled=True)) == list(range(5))
    with counter(100, "bytes", enabled=True) as advance:
        advance(60)
        advance(40)
    drawn = term.getvalue()
    assert "work" in drawn and "bytes" in drawn
    disable_progress_bars()
    try:
        term.seek(0)
        term.truncate()
        assert list(bar(range(5), "work", enabled=True)) == list(range(5))
        with counter(100, "bytes", enabled=True) as advance:
            advance(100)
        assert term.getvalue() == ""
    finally:
        enable_progress_bars()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    assert list(bar(range(3), "work", enabled=True)) == [0, 1, 2]
    assert piped.getvalue() == ""


def test_loading_a_transformers_model_leaves_the_bars_as_they_were(bars_on):
    from transformers.utils import logging as transformers_logging

    from modelstore.serving.hf_models import no_loading_bars
    with no_loading_bars():
        assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
