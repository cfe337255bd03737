"""torch's vocabulary: the rebuild functions of tensors, parameters, storages views, sparse,
nested and meta tensors, torch.Size and TorchScript's list builders, as inert TensorRecords."""

from __future__ import annotations

from typing import Any

from ckptctl import dtypes
from ckptctl.formats.pickles.records import (
    Global,
    MachineLike,
    NumpyArray,
    Opaque,
    StorageRef,
    TensorRecord,
    _ints,
)

_ITEMSIZE = {name: d.itemsize for name, d in dtypes.BY_NAME.items()}  # dtypes.DType.itemsize, without the property call


def _dtype_of_global(g: Any, m: MachineLike) -> str:
    if isinstance(g, Global) and g.module == "torch":
        if g.name in dtypes.BY_NAME:
            return g.name
        try:
            return dtypes.get(g.name).name
        except KeyError:
            pass
    if isinstance(g, str) and g.removeprefix("torch.") in dtypes.BY_NAME:
        return g.removeprefix("torch.")
    m._fail(f"unknown tensor dtype {getattr(g, 'full', g)!r:.60}")
    raise AssertionError  # pragma: no cover


def _tensor(
    m: MachineLike, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None, fn: str
) -> TensorRecord:
    # what torch writes, in one pass (this runs once per tensor: 10^5 times in a mixture-of-experts
    # checkpoint): a storage, an int offset, size and stride tuples of non-negative ints of one
    # length. Anything else (or a view past the storage's end) takes the checks below, in their
    # order, with their messages.
    if type(storage) is StorageRef and type(offset) is int and offset >= 0 and type(size) is tuple:
        if type(stride) is tuple and len(size) == len(stride):
            numel, last = 1, offset
            for s, st in zip(size, stride):
                if type(s) is not int or s < 0 or type(st) is not int or st < 0:
                    break
                numel *= s
                last += (s - 1) * st
            else:
                sdt = storage.dtype
                if dtype is None:
                    dtype = sdt
                if (
                    not numel
                    or (last + 1) * _ITEMSIZE[dtype]
                    <= (storage.view_numel if storage.view_numel is not None else storage.numel) * _ITEMSIZE[sdt]
                ):
                    return TensorRecord(storage, offset, size, stride, dtype, None, None)
    # what torch writes: tuples of non-negative ints, checked inline; anything else goes
    # through _ints' messages
    shape, strides = size, stride
    if type(size) is tuple:
        for v in size:
            if type(v) is not int or v < 0:
                shape = _ints(size, f"{fn}: size", m)
    else:
        shape = _ints(size, f"{fn}: size", m)
    if type(stride) is tuple:
        for v in stride:
            if type(v) is not int or v < 0:
                strides = _ints(stride, f"{fn}: stride", m)
    else:
        strides = _ints(stride, f"{fn}: stride", m)
    if len(shape) != len(strides):
        m._fail(f"{fn}: size {shape} and stride {strides} differ in length")
    if type(offset) is not int or offset < 0:
        m._fail(f"{fn}: storage offset {offset!r:.40}")
    note = None
    if type(storage) is StorageRef or isinstance(storage, StorageRef):
        sdt = storage.dtype
        if dtype is None:
            dtype = sdt
        itemsize = _ITEMSIZE[dtype]
        # the element range the view touches must lie inside the storage
        numel, last = 1, offset
        for s, st in zip(shape, strides):
            numel *= s
            last += (s - 1) * st
        if numel:
            cap_bytes = (storage.view_numel if storage.view_numel is not None else storage.numel) * _ITEMSIZE[sdt]
            if (last + 1) * itemsize > cap_bytes:
                m._fail(
                    f"tensor view (offset {offset}, size {list(shape)}, stride {list(strides)}) reaches past "
                    f"the end of storage {storage.key!r} ({cap_bytes} bytes)"
                )
    else:
        if dtype is None:
            dtype = "uint8"
            if isinstance(storage, (Global, Opaque)):
                dtype = _storage_dtype_name(storage) or "uint8"
        note = "no data in the file (the storage is not part of the checkpoint)"
        storage = None
    return TensorRecord(storage, offset, shape, strides, dtype, None, note)


def _storage_dtype_name(x: Any) -> str | None:
    name = x.name if isinstance(x, Global) else None
    if name and name in dtypes.BY_STORAGE:
        return dtypes.BY_STORAGE[name].name
    return None


def _h_rebuild_v2(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if len(a) < 4:
        m._fail(f"{g.full} with {len(a)} arguments")
    return _tensor(m, a[0], a[1], a[2], a[3], None, g.name)


def _h_rebuild_v3(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if len(a) < 7:
        m._fail(f"{g.full} with {len(a)} arguments")
    return _tensor(m, a[0], a[1], a[2], a[3], _dtype_of_global(a[6], m), g.name)


def _h_rebuild_qtensor(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if len(a) < 5:
        m._fail(f"{g.full} with {len(a)} arguments")
    t = _tensor(m, a[0], a[1], a[2], a[3], None, g.name)
    t.qparams = a[4]
    return t


def _h_first_tensor(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """_rebuild_parameter(data, ...), Parameter(data, ...), _rebuild_device_tensor_from_cpu_tensor."""
    if not a:
        if kw and "data" in kw:
            return kw["data"]
        return Opaque(g.full, a, kw)
    t = a[0]
    if isinstance(t, (TensorRecord, NumpyArray)):
        if g.name == "_rebuild_device_tensor_from_cpu_tensor" and len(a) > 1 and isinstance(t, TensorRecord):
            want = _dtype_of_global(a[1], m)
            if want != t.dtype:
                m.warnings.append(
                    f"a tensor is cast from {t.dtype} to {want} when torch loads it; listed as stored ({t.dtype})"
                )
        return t
    return Opaque(g.full, a, kw)


def _h_from_numpy(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    return a[0] if a and isinstance(a[0], NumpyArray) else Opaque(g.full, a, kw)


def _h_meta(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if len(a) < 3:
        m._fail(f"{g.full} with {len(a)} arguments")
    dt = _dtype_of_global(a[0], m)
    shape = _ints(a[1], "size", m)
    stride = _ints(a[2], "stride", m)
    return TensorRecord(None, 0, shape, stride, dt, note="a 'meta' tensor: shape and dtype only")


_SPARSE_PARTS = {
    "torch.sparse_coo": ("indices", "values", "size", "is_coalesced"),
    "torch.sparse_csr": ("crow_indices", "col_indices", "values", "size"),
    "torch.sparse_bsr": ("crow_indices", "col_indices", "values", "size"),
    "torch.sparse_csc": ("ccol_indices", "row_indices", "values", "size"),
    "torch.sparse_bsc": ("ccol_indices", "row_indices", "values", "size"),
}


def _h_sparse(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """_rebuild_sparse_tensor(layout, data): an object whose parts (indices, values) are tensors."""
    layout = a[0] if a else None
    layout = layout.full if isinstance(layout, Global) else layout
    parts = _SPARSE_PARTS.get(layout) if isinstance(layout, str) else None
    if parts is None or len(a) < 2 or not isinstance(a[1], tuple):
        return Opaque(g.full, a)
    o = Opaque(f"{layout} tensor")
    o.state = dict(zip(parts, a[1]))
    return o


def _h_nested(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    o = Opaque("torch.nested tensor")
    o.state = dict(zip(("buffer", "sizes", "strides", "storage_offsets"), a))
    return o


def _h_get_layout(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    return a[0] if len(a) == 1 and isinstance(a[0], str) else Opaque(g.full, a)


def _h_from_type_v2(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if len(a) < 3:
        m._fail(f"{g.full} with {len(a)} arguments")
    func, _new_type, args = a[0], a[1], a[2]
    if type(args) is not tuple:
        m._fail(f"{g.full} with non-tuple arguments")
    result = m._call(func, args)
    if len(a) > 3 and isinstance(result, Opaque) and a[3] is not None:
        m._build(result, a[3])
    return result


def _h_size(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    if a and isinstance(a[0], (tuple, list)):
        return tuple(a[0])
    return ()


def _h_jit_list(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """torch.jit._pickle.build_intlist / build_doublelist / ... (TorchScript pickles): the list."""
    return a[0] if len(a) == 1 and isinstance(a[0], list) else Opaque(g.full, a)


def _h_jit_type_tag(m: MachineLike, g: Global, a: tuple, kw) -> Any:
    """torch.jit._pickle.restore_type_tag(value, 'Dict[str, float]'): the value."""
    return a[0] if a else Opaque(g.full, a)


_TORCH_UTILS = "torch._utils."
HANDLERS: dict[str, Any] = {
    _TORCH_UTILS + "_rebuild_tensor_v2": _h_rebuild_v2,
    _TORCH_UTILS + "_rebuild_tensor": _h_rebuild_v2,
    _TORCH_UTILS + "_rebuild_tensor_v3": _h_rebuild_v3,
    _TORCH_UTILS + "_rebuild_qtensor": _h_rebuild_qtensor,
    _TORCH_UTILS + "_rebuild_parameter": _h_first_tensor,
    _TORCH_UTILS + "_rebuild_parameter_with_state": _h_first_tensor,
    _TORCH_UTILS + "_rebuild_device_tensor_from_cpu_tensor": _h_first_tensor,
    _TORCH_UTILS + "_rebuild_device_tensor_from_numpy": _h_from_numpy,
    _TORCH_UTILS + "_rebuild_xla_tensor": _h_from_numpy,
    _TORCH_UTILS + "_rebuild_meta_tensor_no_storage": _h_meta,
    _TORCH_UTILS + "_rebuild_sparse_tensor": _h_sparse,
    _TORCH_UTILS + "_rebuild_nested_tensor": _h_nested,
    "torch.serialization._get_layout": _h_get_layout,
    "torch._tensor._rebuild_from_type_v2": _h_from_type_v2,
    "torch._tensor._rebuild_from_type": _h_from_type_v2,
    "torch.nn.parameter.Parameter": _h_first_tensor,
    "torch.nn.parameter.Buffer": _h_first_tensor,
    "torch.Size": _h_size,
    "torch.jit._pickle.build_intlist": _h_jit_list,
    "torch.jit._pickle.build_doublelist": _h_jit_list,
    "torch.jit._pickle.build_boollist": _h_jit_list,
    "torch.jit._pickle.build_tensorlist": _h_jit_list,
    "torch.jit._pickle.build_complexlist": _h_jit_list,
    "torch.jit._pickle.restore_type_tag": _h_jit_type_tag,
}
