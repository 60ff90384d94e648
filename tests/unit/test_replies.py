"""`VisibleText` (incremental, linear) must agree with `visible_text` (whole text) on every split of every text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.protocol import strip_reasoning
from worker.serving.replies import VisibleText

pieces = st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "<th", "think>", " ", "\n", "a", "b c", "x"]))


def streamed(parts: list[str], *, strip: bool) -> tuple[str, bool]:
    visible = VisibleText(strip)
    shown = "".join(visible.feed(p) for p in parts)
    return shown, visible.stopped


@given(pieces)
def test_streamed_text_is_a_prefix_of_the_final_text(parts: list[str]) -> None:
    for strip in (True, False):
        final = strip_reasoning("".join(parts)) if strip else "".join(parts).strip()
        shown, stopped = streamed(parts, strip=strip)
        if not stopped:  # a stray </think> stops the stream: the final text is authoritative then
            assert final.startswith(shown), (parts, shown, final)


@given(pieces)
def test_without_a_stray_close_tag_the_stream_shows_all_but_trailing_space(parts: list[str]) -> None:
    shown, stopped = streamed(parts, strip=True)
    final = strip_reasoning("".join(parts))
    if not stopped and "<" not in final[len(shown) :]:
        assert shown == final
