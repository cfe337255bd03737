"""Pausing the cyclic garbage collector while 10^5 small objects are built."""

from __future__ import annotations

import gc


class paused_gc:
    """The cyclic garbage collector paused while a header's or a pickle's objects are built, and
    those objects then moved to its oldest generation without a look. At 10^5 tensors the
    TensorInfo records are ~4 * 10^5 tracked objects (json.loads' are freed before the end), and
    the restricted unpickler builds as many again (tuples, storage refs, tensor records); the
    collections they set off walked them again and again, about a third of `inspect`'s CPU
    (issue 13). A pause alone only postpones that: every object made meanwhile is young when the
    collector is back on, and the first allocation walks them all (0.15-0.2 s for a safetensors
    header, 0.3-0.4 s for a `.pt` of 10^5 tensors). gc.freeze() + gc.unfreeze() moves them to the
    oldest generation in O(1), where only a full collection looks at them (reference counting
    frees them as before; a cycle among them, which a pickle can build, waits for that full
    collection). Not done when someone else froze objects (unfreeze would thaw theirs too);
    pauses nest (only the outermost does this)."""

    def __enter__(self) -> None:
        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc) -> None:
        if self._was:
            if not gc.get_freeze_count():
                gc.freeze()
                gc.unfreeze()
            gc.enable()
