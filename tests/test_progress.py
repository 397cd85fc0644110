"""Progress bars: drawn on a terminal, silent when piped, and off by huggingface_hub's switch."""

from __future__ import annotations

import io
import sys

from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

from modelstore.progress import bar, counter


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_draw_on_a_terminal_only_and_follow_the_hub_switch(monkeypatch):
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
