"""formats/gcpause.paused_gc: the collector is back on afterwards (also after an error), pauses
nest, objects built inside end up untracked by the young generations, and objects someone else
froze stay frozen."""

from __future__ import annotations

import gc

import pytest

from ckptctl.formats.gcpause import paused_gc


@pytest.fixture
def gc_on():
    was = gc.isenabled()
    gc.enable()
    yield
    gc.unfreeze()
    if not was:
        gc.disable()


def test_the_collector_is_back_on_after_a_pause_and_after_an_error(gc_on):
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), paused_gc():
        raise ValueError("x")
    assert gc.isenabled()


def test_pauses_nest_and_only_the_outermost_freezes(gc_on):
    with paused_gc():
        with paused_gc():
            pass
        assert not gc.isenabled()  # the inner one did not turn it back on
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0  # frozen, then thawed into the oldest generation


def test_what_was_built_inside_is_in_the_oldest_generation(gc_on):
    gc.collect()
    with paused_gc():
        built = [[i] for i in range(50_000)]
    assert gc.get_count()[0] < 1000  # not 50,000 young objects for the next collection to walk
    del built


def test_objects_someone_else_froze_stay_frozen(gc_on):
    keep = [[i] for i in range(100)]
    gc.freeze()
    n = gc.get_freeze_count()
    with paused_gc():
        pass
    assert gc.get_freeze_count() == n and gc.isenabled()
    del keep


def test_the_readers_leave_the_collector_on(gc_on, tmp_path):
    """The safetensors reader and the unpickler pause it and turn it back on."""
    torch = pytest.importorskip("torch")
    from ckptctl.formats import open_reader

    sd = {f"w{i}": torch.zeros(2) for i in range(10)}
    torch.save(sd, tmp_path / "m.pt")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(sd, tmp_path / "m.safetensors")
    for name in ("m.pt", "m.safetensors"):
        with open_reader(tmp_path / name) as r:
            assert len(r.info().tensors) == 10
        assert gc.isenabled(), name
