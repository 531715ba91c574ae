"""Store conformance: one suite, run against the memory and the disk backend, for every item type.

Whatever a pipeline does with a store must give the same result on both backends (issue 4,
item 6), so every behaviour of the interface is pinned here once and run against both.
Disk-only behaviour (file names, atomicity, corruption, resume) is in ``test_cache_disk.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.cache import (
    CorruptItem,
    DiskStore,
    ImageCodec,
    ListView,
    MemoryStore,
    MissingItem,
    Store,
    TensorCodec,
    as_store,
    image_store,
    tensor_store,
)

LENGTH = 5
IMAGE_SIZE = (24, 16)  # (width, height)
TENSOR_SHAPE = (4, 6, 5)

# item kind -> (codec factory, value factory)
KINDS = {
    "image": (lambda: ImageCodec(IMAGE_SIZE), lambda seed: _image(seed)),
    "float32": (lambda: TensorCodec(TENSOR_SHAPE, torch.float32), lambda seed: _tensor(seed, torch.float32)),
    "float16": (lambda: TensorCodec(TENSOR_SHAPE, torch.float16), lambda seed: _tensor(seed, torch.float16)),
    "bfloat16": (lambda: TensorCodec(TENSOR_SHAPE, torch.bfloat16), lambda seed: _tensor(seed, torch.bfloat16)),
    "int64": (lambda: TensorCodec(TENSOR_SHAPE, torch.int64), lambda seed: _tensor(seed, torch.int64)),
    "uint8": (lambda: TensorCodec(TENSOR_SHAPE, torch.uint8), lambda seed: _tensor(seed, torch.uint8)),
    "bool": (lambda: TensorCodec(TENSOR_SHAPE, torch.bool), lambda seed: _tensor(seed, torch.bool)),
}


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8), "RGB")


def _tensor(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(TENSOR_SHAPE, generator=g) > 0.5
    if dtype.is_floating_point:  # extreme values too, so a lossy format would show
        t = torch.randn(TENSOR_SHAPE, generator=g) * 1e3
        t.view(-1)[:3] = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).tiny, -0.0])
        return t.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, TENSOR_SHAPE, generator=g, dtype=torch.int64).to(dtype)


def _same(a, b) -> bool:
    if isinstance(a, Image.Image):
        return isinstance(b, Image.Image) and b.mode == "RGB" and b.size == a.size and a.tobytes() == b.tobytes()
    return isinstance(b, torch.Tensor) and b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)


@pytest.fixture(params=["memory", "disk"])
def backend(request):
    return request.param


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param


@pytest.fixture
def make(backend, kind, tmp_path):
    """make(length=LENGTH) -> a fresh store of this backend and item kind; value(seed) -> an item."""
    codec_factory, _ = KINDS[kind]
    counter = iter(range(1000))

    def make_store(length: int = LENGTH) -> Store:
        if backend == "memory":
            return MemoryStore(length, codec_factory())
        return DiskStore(tmp_path / f"store{next(counter)}", length, codec_factory())

    return make_store


@pytest.fixture
def value(kind):
    return KINDS[kind][1]


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_exact(make, value):
    store = make()
    for i in range(LENGTH):
        store.put(i, value(i))
    for i in range(LENGTH):
        item = store[i]
        assert _same(value(i), item), f"item {i} changed on the way through {store!r}"
        if isinstance(item, torch.Tensor):
            assert item.device.type == "cpu" and item.is_contiguous()


def test_len_missing_complete(make, value):
    store = make()
    assert len(store) == LENGTH
    assert store.missing() == list(range(LENGTH)) and not store.complete()
    store.put(3, value(3))
    store.put(1, value(1))
    assert store.missing() == [0, 2, 4]
    for i in (0, 2, 4):
        store.put(i, value(i))
    assert store.missing() == [] and store.complete()
    assert len(store) == LENGTH


def test_overwrite_replaces_the_item(make, value):
    store = make()
    store.put(2, value(10))
    store.put(2, value(20))
    assert _same(value(20), store[2])
    assert store.missing() == [0, 1, 3, 4]


def test_delete_and_clear(make, value):
    store = make()
    for i in range(LENGTH):
        store.put(i, value(i))
    store.delete(1)
    assert 1 not in store and store.missing() == [1]
    with pytest.raises(MissingItem):
        store[1]
    store.delete(1)  # deleting an empty slot is not an error
    store.clear()
    assert store.missing() == list(range(LENGTH))
    store.put(0, value(0))  # still usable after clear
    assert _same(value(0), store[0])


def test_negative_indices_count_from_the_end(make, value):
    store = make()
    store.put(-1, value(7))
    assert store.missing() == [0, 1, 2, 3]
    assert _same(value(7), store[LENGTH - 1]) and _same(value(7), store[-1])
    assert store.has(-1) and -1 in store and (LENGTH - 1) in store
    store.delete(-1)
    assert store.missing() == list(range(LENGTH))


def test_out_of_range_is_index_error(make, value):
    store = make()
    for bad in (LENGTH, -LENGTH - 1, 10**9):
        with pytest.raises(IndexError, match=str(bad)):
            store[bad]
        with pytest.raises(IndexError):
            store.put(bad, value(0))
        with pytest.raises(IndexError):
            store.delete(bad)
        assert not store.has(bad) and bad not in store
    assert store.missing() == list(range(LENGTH))


def test_never_written_is_missing_item_not_index_error(make):
    store = make()
    with pytest.raises(MissingItem, match="never written") as caught:
        store[2]
    assert isinstance(caught.value, KeyError) and not isinstance(caught.value, CorruptItem)
    assert caught.value.index == 2


def test_iteration_in_index_order_and_stops_at_a_gap(make, value):
    store = make()
    for i in reversed(range(LENGTH)):  # written out of order
        store.put(i, value(i))
    items = list(store)
    assert len(items) == LENGTH and all(_same(value(i), item) for i, item in enumerate(items))
    assert all(_same(value(i), item) for i, item in zip(range(1, 4), store[1:4]))
    store.delete(3)
    with pytest.raises(MissingItem):
        list(store)


def test_in_means_committed(make, value):
    store = make()
    assert 0 not in store
    store.put(0, value(0))
    assert 0 in store and store.has(0)
    assert "0" not in store and 0.0 not in store and None not in store
    assert np.int64(0) in store  # numpy integers are indices too
    with pytest.raises(TypeError, match="integers"):
        store[0.0]


def test_items_are_independent_of_the_caller(make, value):
    """Changing a value after put, or an item after get, never changes what the store holds."""
    store = make()
    original = value(1)
    given = original.copy() if isinstance(original, Image.Image) else original.clone()
    store.put(0, given)
    _scribble(given)
    _scribble(store[0])
    assert _same(original, store[0])


def _scribble(item) -> None:
    """Change ``item`` in place."""
    if isinstance(item, Image.Image):
        item.paste((1, 2, 3), (0, 0, 8, 8))
    elif item.dtype == torch.bool:
        item.logical_not_()
    else:
        item.add_(1)


def test_put_rejects_values_that_do_not_fit(make, kind):
    store = make()
    if kind == "image":
        bad = {ValueError: Image.new("RGB", (IMAGE_SIZE[0] + 1, IMAGE_SIZE[1])), TypeError: "frame.png"}
    else:
        dtype = KINDS[kind][1](0).dtype
        other = torch.float64 if dtype != torch.float64 else torch.float32
        bad = {ValueError: torch.zeros(TENSOR_SHAPE, dtype=other), TypeError: [[1, 2], [3, 4]]}
    for error, candidate in bad.items():
        with pytest.raises(error):
            store.put(0, candidate)
    if kind != "image":
        with pytest.raises(ValueError, match=r"shape"):
            store.put(0, torch.zeros((1, *TENSOR_SHAPE), dtype=KINDS[kind][1](0).dtype))
    assert store.missing() == list(range(LENGTH))


def test_closed_store_refuses_use(make, value):
    with make() as store:
        store.put(0, value(0))
    assert store.closed
    with pytest.raises(ValueError, match="closed"):
        store[0]
    with pytest.raises(ValueError, match="closed"):
        store.put(1, value(1))
    store.close()  # twice is fine


def test_empty_store(make):
    store = make(0)
    assert len(store) == 0 and store.missing() == [] and store.complete() and list(store) == []
    with pytest.raises(IndexError):
        store[0]


# --------------------------------------------------------------------------- typed inputs


def test_image_put_accepts_arrays_and_other_modes(backend, tmp_path):
    store = image_store(None if backend == "memory" else tmp_path, 3, size=IMAGE_SIZE)
    rgb = _image(0)
    store.put(0, np.asarray(rgb))
    store.put(1, rgb.convert("RGBA"))
    store.put(2, rgb.convert("L"))
    assert _same(rgb, store[0]) and _same(rgb, store[1])
    assert _same(rgb.convert("L").convert("RGB"), store[2])
    with pytest.raises(ValueError, match=r"uint8 of shape \(H, W, 3\)"):
        store.put(0, np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        store.put(0, np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.float32))


def test_tensor_put_accepts_numpy_and_wildcard_shapes(backend, tmp_path):
    store = tensor_store(None if backend == "memory" else tmp_path, 2, shape=(4, None, None), dtype=torch.float32)
    store.put(0, np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2))
    store.put(1, torch.ones(4, 7, 9, requires_grad=True))  # detached on the way in
    assert torch.equal(store[0], torch.arange(24, dtype=torch.float32).reshape(4, 3, 2))
    assert store[1].shape == (4, 7, 9) and not store[1].requires_grad
    with pytest.raises(ValueError, match=r"\(4, \*, \*\)"):
        store.put(0, torch.zeros(3, 7, 9))


def test_unusual_tensors_round_trip(backend, tmp_path):
    values = [
        torch.tensor(3.5),  # 0-dim
        torch.tensor(-2.0).to(torch.bfloat16),
        torch.zeros(0, 4),  # no elements
        torch.arange(12.0).reshape(3, 4).T,  # not contiguous
        torch.randn(5)[::2],  # strided view
        torch.randn(2, 3, dtype=torch.complex64).conj(),  # lazy conjugate
    ]
    read_only = np.arange(3, dtype=np.float32)
    read_only.flags.writeable = False  # like np.load(mmap_mode="r")
    store = tensor_store(None if backend == "memory" else tmp_path, len(values) + 1)
    for i, v in enumerate(values):
        store.put(i, v)
    store.put(-1, read_only)
    for i, v in enumerate(values):
        assert store[i].dtype == v.dtype and store[i].shape == v.shape and torch.equal(store[i], v.resolve_conj())
    assert torch.equal(store[-1], torch.arange(3.0))


def test_convenience_constructors_pick_the_backend(tmp_path):
    assert isinstance(image_store(None, 3), MemoryStore)
    assert isinstance(tensor_store(None, 3, dtype=torch.float16), MemoryStore)
    disk = image_store(tmp_path / "frames", 3, size=(8, 8))
    assert isinstance(disk, DiskStore) and disk.codec.size == (8, 8)
    assert isinstance(tensor_store(str(tmp_path / "latents"), 3, shape=(4, 8, 8)), DiskStore)


def test_uncoded_memory_store_keeps_any_object():
    store = MemoryStore(2)
    payload = {"embedding": torch.zeros(2)}
    store.put(0, payload)
    store.put(1, None)  # None is an item, not an empty slot
    assert store[0] is payload and store[1] is None and store.complete()


# --------------------------------------------------------------------------- ListView / as_store


def test_list_view_is_a_read_only_store():
    frames = [_image(i) for i in range(3)]
    view = ListView(frames)
    assert len(view) == 3 and view[-1] is frames[2] and view.complete() and view.missing() == []
    assert 2 in view and 3 not in view and list(view) == frames
    with pytest.raises(IndexError):
        view[3]
    for action in (lambda: view.put(0, frames[0]), lambda: view.delete(0), view.clear):
        with pytest.raises(TypeError, match="read-only"):
            action()


def test_list_view_with_codec_normalises_and_checks_items():
    items = [_image(0).convert("RGBA"), np.asarray(_image(1)), Image.new("RGB", (3, 3))]
    view = ListView(items, ImageCodec(IMAGE_SIZE))
    assert _same(_image(0), view[0]) and _same(_image(1), view[1])
    with pytest.raises(ValueError, match="3x3"):
        view[2]


def test_as_store_adapts_sequences_and_keeps_stores():
    class LazyFrames:  # like a video reader: len and [i], nothing else
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((2,), float(i))

    store = MemoryStore(2)
    assert as_store(store) is store
    assert isinstance(as_store([1, 2]), ListView) and as_store((1, 2))[1] == 2
    lazy = as_store(LazyFrames())
    assert len(lazy) == 4 and torch.equal(lazy[-1], torch.full((2,), 3.0))
    batch = as_store(torch.zeros(3, 4, 8, 8), TensorCodec((4, 8, 8)))
    assert len(batch) == 3 and batch[0].shape == (4, 8, 8)
    for bad in ("frames", {0: 1}, 42, _image(0)):
        with pytest.raises(TypeError, match="expected a store"):
            as_store(bad)
