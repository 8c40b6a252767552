"""mailflow.heap.settle: what a long-lived process keeps is left out of full collections."""
from __future__ import annotations

import gc
import weakref

from mailflow import heap


class _Node:
    def __init__(self) -> None:
        self.me = self   # a cycle: only the garbage collector frees it


def test_settle_collects_garbage_then_freezes_what_is_alive() -> None:
    try:
        gc.unfreeze()
        garbage = _Node()
        gone = weakref.ref(garbage)
        del garbage
        kept = _Node()
        heap.settle()
        assert gone() is None                      # collected first
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())   # frozen: not walked any more

        # the next call unfreezes first: garbage made of frozen objects is collected then
        kept_ref = weakref.ref(kept)
        del kept
        heap.settle()
        assert kept_ref() is None
    finally:
        gc.unfreeze()
