"""HDF5 (any file, Keras 2 / Keras 3 / HF tf_model.h5 recognised) through h5py, imported lazily.

Every numeric dataset is a tensor named by its path without the leading '/'. Listing reads
dataset headers and attributes only. Bytes come from os.pread for contiguous, unfiltered,
little-endian datasets (the common case) and from h5py slices along the leading dimensions
otherwise, never more than one bounded chunk at a time; big-endian data comes out little-endian.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckptctl import dtypes
from ckptctl.errors import CorruptFile, NotFound
from ckptctl.formats.base import CHUNK, Reader
from ckptctl.model import CheckpointInfo, ObjectInfo, TensorInfo
from ckptctl.sources import is_remote, open_source

ALIASES_ATTR = "ckptctl.aliases"  # root attribute written by `ckptctl convert --dedupe`
ESCAPING_ATTR = "ckptctl.name_escaping"  # "percent": names mapped by ckptctl's writer (write_hdf5.py)
MAX_LINKS = 2_000_000  # guards a file whose group links make the walk explode
MAX_ATTR_CHARS = 1000  # longer string attributes are summarised in metadata
MAX_ATTR_ITEMS = 16  # longer attribute arrays are summarised in metadata


@dataclass(frozen=True)
class _Loc:
    path: str  # dataset path inside the file ('/'-rooted)
    np_dtype: Any  # numpy dtype the bytes are produced in (little-endian)
    offset: int | None  # file offset when the bytes lie contiguous in the file as they are
    length: int


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return v


def _attr_list(obj, name: str) -> list[str]:
    """A Keras list attribute, merging the name0, name1, ... pieces it is split into past 64 KB."""
    attrs = obj.attrs
    if name in attrs:
        vals = attrs[name]
    else:
        vals = []
        i = 0
        while f"{name}{i}" in attrs:
            vals.extend(list(attrs[f"{name}{i}"]))
            i += 1
    try:
        return [str(_decode(v)) for v in list(vals)]
    except TypeError:  # a scalar attribute
        return [str(_decode(vals))]


def attr_value(v: Any) -> Any:
    """An attribute as a short JSON-able value: decoded text, small lists, summaries of big ones."""
    import numpy as np

    v = _decode(v)
    if isinstance(v, str):
        return v if len(v) <= MAX_ATTR_CHARS else f"<text of {len(v)} characters>"
    if isinstance(v, np.ndarray):
        if v.ndim <= 1 and v.size <= MAX_ATTR_ITEMS:
            return [attr_value(x) for x in v.tolist()]
        kind = "text" if v.dtype.kind in "SUO" else str(v.dtype)
        return f"<{kind} array of shape {list(v.shape)}>"
    if isinstance(v, np.generic):
        return attr_value(v.item())
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [attr_value(x) for x in v[:MAX_ATTR_ITEMS]]
    return str(v)[:MAX_ATTR_CHARS]


def _json_attr(attrs, name: str) -> dict | None:
    if name not in attrs:
        return None
    try:
        v = json.loads(_decode(attrs[name]))
    except (ValueError, TypeError):
        return None
    return v if isinstance(v, dict) else None


class HDF5Reader(Reader):
    format = "hdf5"
    # where the HDF5 file's byte 0 lies in self.path: 0, or further in for an HDF5 file stored in
    # a container (a .keras zip member); None when its bytes are not stored as they are (compressed)
    base_offset: int | None = 0

    def __init__(self, path):
        super().__init__(path)
        self._f = None
        self._src = None  # sources.LocalSource / RemoteSource for direct reads of contiguous data
        self._fobj = None  # the file object h5py reads when the file is remote
        self._guarded = False  # _crash_guard has walked the file in a child process

    # -- file access ---------------------------------------------------------------------------
    def _file(self):
        if self._f is None:
            import h5py

            if not self._guarded and not is_remote(self.path) and os.path.exists(self.path):
                self._guarded = True  # also in the child, which opens the file through here
                self._crash_guard()
            if is_remote(self.path):
                self._fobj = self._source().open()  # h5py reads any file object (block-cached)
            elif not os.path.exists(self.path):
                raise NotFound("no such file or directory", self.path)
            elif not os.access(self.path, os.R_OK):
                raise NotFound("permission denied", self.path)
            try:
                self._f = self._open_h5(h5py)
            except PermissionError:
                raise NotFound("permission denied", self.path) from None
            except OSError as e:
                if e.errno == errno.EACCES:
                    raise NotFound("permission denied", self.path) from None
                raise CorruptFile(f"not a readable HDF5 file ({_h5msg(e)})", self.path) from None
        return self._f

    def _crash_guard(self) -> None:
        """Walk the file's metadata in a forked child first (hdf5_guard.py): a libhdf5 crash, hang
        or runaway allocation becomes one CorruptFile line instead of killing ckptctl."""
        from ckptctl.formats import hdf5_guard

        hdf5_guard.crash_guard(self.path, lambda: self._build_info(self._file()))

    def _open_h5(self, h5py):
        """The h5py.File to list and read; a subclass may open one over a file object instead."""
        if self._fobj is not None:
            return h5py.File(self._fobj, "r")
        try:
            return h5py.File(self.path, "r")
        except OSError as e:
            # HDF5 keeps one handle per file in a process: match another opener's flags
            if "locking flag" not in str(e):
                raise
            return h5py.File(self.path, "r", locking=False)

    def _source(self):
        """The file's byte source (sources.open_source): pread / iter_range / size."""
        if self._src is None:
            self._src = open_source(self.path)
        return self._src

    _fdesc = _source  # the name subclasses used when this was an os-level descriptor

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            finally:
                self._f = None
        if self._fobj is not None:
            self._fobj.close()
            self._fobj = None
        if self._src is not None:
            self._src.close()
            self._src = None

    # -- metadata ------------------------------------------------------------------------------
    def _load_info(self) -> CheckpointInfo:
        f = self._file()
        try:
            return self._build_info(f)
        except OSError as e:  # h5py reports damaged object headers as OSError/RuntimeError
            raise CorruptFile(f"damaged HDF5 structure ({_h5msg(e)})", self.path) from None
        except RuntimeError as e:
            raise CorruptFile(f"damaged HDF5 structure ({_h5msg(e)})", self.path) from None

    def _build_info(self, f) -> CheckpointInfo:
        import h5py

        warnings: list[str] = []
        found: dict[str, Any] = {}  # path -> h5py Dataset, in walk order
        try:
            root = f["/"]
        except KeyError as e:  # h5py's error when the root group's object header cannot be loaded
            raise CorruptFile(f"damaged HDF5 structure ({_h5msg(e)})", self.path) from None
        self._walk(root, "", found, set(), warnings, h5py)

        kind, meta, preferred = self._recognise(f, found)
        order = [p for p in preferred if p in found]
        seen = set(order)
        order += [p for p in found if p not in seen]

        # tied weights declared by ckptctl's writer: {alias: target}; the target is the stored one
        declared: dict[str, str] = {}
        root_attrs = f["/"].attrs
        if ALIASES_ATTR in root_attrs:
            declared = self._declared_aliases(root_attrs[ALIASES_ATTR], warnings)
        addrs = {p: _addr_id(oid, h5py) for p, oid in found.items()}

        tensors: list[TensorInfo] = []
        objects: list[ObjectInfo] = []
        first_by_addr: dict[Any, str] = {}
        by_name: dict[str, TensorInfo] = {}
        for p in order:
            target = declared.get(p)
            if target is not None and target in found and addrs[p] is not None and addrs[p] == addrs[target]:
                continue  # a hard link the attribute names as an alias: listed below, after its target
            addr = addrs[p]
            if addr is not None and addr in first_by_addr:
                first = by_name.get(first_by_addr[addr])
                if first is not None:
                    t = TensorInfo(p, first.dtype, first.shape, first.nbytes, alias_of=first.name, loc=first.loc)
                    tensors.append(t)
                    by_name[p] = t
                continue
            if addr is not None:
                first_by_addr[addr] = p
            t_or_obj = self._describe(h5py.Dataset(found[p]), p, warnings, h5py)
            if isinstance(t_or_obj, TensorInfo):
                tensors.append(t_or_obj)
                by_name[p] = t_or_obj
            else:
                objects.append(t_or_obj)

        for alias, target in declared.items():
            tgt = by_name.get(target)
            if alias in by_name:
                warnings.append(f"ignored tied-weight alias {alias!r}: a separate dataset of that name is stored")
            elif tgt is None:
                warnings.append(f"ignored tied-weight alias {alias!r}: its target {target!r} is not in the file")
            else:
                a = TensorInfo(alias, tgt.dtype, tgt.shape, tgt.nbytes, alias_of=tgt.alias_of or target, loc=tgt.loc)
                tensors.append(a)
                by_name[alias] = a
        if _decode(root_attrs.get(ESCAPING_ATTR)) == "percent":  # give back the names ckptctl mapped
            from dataclasses import replace

            from ckptctl.formats.write_hdf5 import unquote_path

            tensors = [
                replace(t, name=unquote_path(t.name), alias_of=unquote_path(t.alias_of) if t.alias_of else None)
                for t in tensors
            ]
            objects = [replace(o, name=unquote_path(o.name)) for o in objects]
        return CheckpointInfo(
            path=str(self.path),
            format=self.format,
            tensors=tensors,
            metadata=meta,
            objects=objects,
            kind=kind,
            files=[str(self.path)],
            warnings=warnings,
        )

    def _walk(self, group, prefix: str, found: dict, ancestors: set, warnings: list[str], h5py) -> None:
        """Collect every dataset path under `group` (hard and soft links; cycles cut).

        Uses h5py's low-level API: the high-level `group.get` costs ~0.1 ms a link.
        """
        gid = group.id if isinstance(group, h5py.Group) else group
        ancestors = ancestors | {_addr_id(gid, h5py)}
        names = list(gid)  # bytes, in creation order when the group tracks it, else by name
        try:
            tracked = gid.get_create_plist().get_link_creation_order() & h5py.h5p.CRT_ORDER_TRACKED
        except Exception:  # noqa: BLE001 - a plist we cannot read: fall back to names
            tracked = 0
        if not tracked:
            names.sort(key=lambda b: _natural_key(b.decode("utf-8", "surrogateescape")))
        for bname in names:
            path = prefix + bname.decode("utf-8", "surrogateescape")
            try:
                link = gid.links.get_info(bname)
            except (KeyError, OSError, RuntimeError):
                link = None
            if link is not None and link.type == h5py.h5l.TYPE_EXTERNAL:
                try:
                    fname, target = gid.links.get_val(bname)[-2:]
                    where = f"{_decode(fname)}:{_decode(target)}"
                except Exception:  # noqa: BLE001
                    where = "another file"
                warnings.append(f"{path}: external link to {where} not followed")
                continue
            try:
                oid = h5py.h5o.open(gid, bname)
            except (KeyError, OSError, RuntimeError, ValueError):
                warnings.append(f"{path}: dangling link skipped")
                continue
            if isinstance(oid, h5py.h5d.DatasetID):
                if len(found) >= MAX_LINKS:
                    raise CorruptFile(f"more than {MAX_LINKS} dataset links", self.path)
                found[path] = oid
            elif isinstance(oid, h5py.h5g.GroupID):
                if _addr_id(oid, h5py) in ancestors:
                    continue  # a link back up the tree
                self._walk(oid, path + "/", found, ancestors, warnings, h5py)

    def _describe(self, ds, path: str, warnings: list[str], h5py) -> TensorInfo | ObjectInfo:
        import numpy as np

        if ds.shape is None:
            return ObjectInfo(path, "hdf5.Empty (null dataspace)")
        try:
            dt = ds.dtype
        except (ValueError, TypeError) as e:  # a datatype numpy has no match for (a custom float layout, ...)
            return ObjectInfo(path, f"HDF5 datatype numpy cannot represent ({_h5msg(e)})")
        shape = tuple(int(s) for s in ds.shape)
        d: dtypes.DType | None = None
        out_dt = None  # numpy dtype of the bytes we produce
        declared = None
        if "dtype" in ds.attrs:
            try:
                declared = dtypes.BY_NAME.get(str(_decode(ds.attrs["dtype"])))
            except Exception:  # noqa: BLE001 - an attribute h5py cannot read is no dtype
                declared = None
        if dt.kind == "V" and dt.fields is None and dt.subdtype is None:  # opaque
            tag = ""
            try:
                tag = _decode(ds.id.get_type().get_tag()) or ""
            except Exception:  # noqa: BLE001
                pass
            tagged = dtypes.BY_NP.get(tag) or dtypes.BY_NAME.get(tag)
            for cand in (tagged, declared):
                if cand is not None and cand.bits == dt.itemsize * 8:
                    d = cand
                    break
            if d is None:
                raw = {1: "bits8", 2: "bits16"}.get(dt.itemsize)
                if raw is None:
                    return ObjectInfo(path, f"hdf5.Opaque ({dt.itemsize}-byte elements, dtype unknown)")
                d = dtypes.BY_NAME[raw]
                warnings.append(f"{path}: opaque {dt.itemsize}-byte data with no dtype attribute; shown as {raw}")
            out_dt = np.dtype(f"V{dt.itemsize}")
        elif dt.kind in "biufc" and dt.subdtype is None:
            try:
                d = dtypes.from_numpy(dt)
            except KeyError:
                return ObjectInfo(path, f"hdf5.Dataset ({dt}, no torch dtype)")
            # Keras 3 / ckptctl convention: bf16/fp8 stored as raw uint bits with attr dtype=<name>
            if declared is not None and declared is not d and dt.kind in "ui" and declared.bits == d.bits:
                d = declared
            out_dt = dt.newbyteorder("<") if dt.byteorder == ">" else dt
        else:
            if dt.kind in "SUO" or h5py.check_string_dtype(dt) is not None:
                what = "string"
            elif dt.fields is not None:
                what = "compound"
            elif h5py.check_vlen_dtype(dt) is not None:
                what = "vlen"
            elif h5py.check_ref_dtype(dt) is not None:
                what = "reference"
            else:
                what = str(dt)
            return ObjectInfo(path, f"hdf5.Dataset ({what}, shape {list(shape)})")
        nbytes = dtypes.nbytes(d, shape)
        off = self._offset(ds, dt, nbytes, h5py) if self.base_offset is not None else None
        off = None if off is None or self.base_offset is None else self.base_offset + off
        return TensorInfo(path, d.name, shape, nbytes, loc=_Loc("/" + path, out_dt, off, nbytes))

    @staticmethod
    def _offset(ds, dt, nbytes: int, h5py) -> int | None:
        """File offset of a contiguous, unfiltered, little-endian dataset's bytes, else None."""
        if dt.byteorder == ">" and dt.itemsize > 1:
            return None
        try:
            dcpl = ds.id.get_create_plist()
            if dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_nfilters() or dcpl.get_external_count():
                return None
            off = ds.id.get_offset()
            if off is None or ds.id.get_storage_size() != nbytes:
                return None
            return int(off)
        except Exception:  # noqa: BLE001 - any doubt: read through h5py instead
            return None

    @staticmethod
    def _declared_aliases(raw, warnings: list[str]) -> dict[str, str]:
        try:
            mapping = json.loads(_decode(raw))
        except (ValueError, TypeError):
            mapping = None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            warnings.append(f"ignored root attribute {ALIASES_ATTR!r}: not a JSON object of names")
            return {}
        return mapping

    # -- Keras / HF recognition ------------------------------------------------------------------
    def _recognise(self, f, found) -> tuple[str | None, dict, list[str]]:
        """(kind, metadata, dataset paths in model order) from the root attributes and layout."""
        attrs = f["/"].attrs
        keys = [k for k in attrs.keys() if k not in (ALIASES_ATTR, ESCAPING_ATTR)]
        meta: dict[str, Any] = {}
        preferred: list[str] = []

        def layer_names_keys(obj) -> set[str]:
            # h5py gives a name that is not UTF-8 as bytes
            return {
                k
                for k in obj.attrs.keys()
                if isinstance(k, str) and (k == "layer_names" or re.fullmatch(r"layer_names\d+", k))
            }

        if "model_config" in attrs or "training_config" in attrs:
            kind = "keras2-model"
            for k in ("keras_version", "backend"):
                if k in attrs:
                    meta[k] = attr_value(attrs[k])
            cfg = _json_attr(attrs, "model_config") or {}
            if isinstance(cfg.get("class_name"), str):
                meta["model_class"] = cfg["class_name"]
            conf = cfg.get("config")
            if isinstance(conf, dict) and isinstance(conf.get("name"), str):
                meta["model_name"] = conf["name"]
            tcfg = _json_attr(attrs, "training_config") or {}
            opt = tcfg.get("optimizer_config")
            if isinstance(opt, dict) and isinstance(opt.get("class_name"), str):
                meta["optimizer"] = opt["class_name"]
            loss = tcfg.get("loss")
            if isinstance(loss, str):
                meta["loss"] = loss
            mw = f.get("model_weights")
            if mw is not None and hasattr(mw, "attrs"):
                for k in ("keras_version", "backend"):
                    if k not in meta and k in mw.attrs:
                        meta[k] = attr_value(mw.attrs[k])
                names = _attr_list(mw, "layer_names")
                meta["layers"] = len(names)
                preferred += _keras2_order(mw, names)
            ow = f.get("optimizer_weights")
            if ow is not None and hasattr(ow, "attrs"):
                preferred += [f"optimizer_weights/{w}" for w in _attr_list(ow, "weight_names")]
            rest = set(keys) - {"model_config", "training_config", "keras_version", "backend"}
        elif layer_names_keys(f["/"]):
            names = _attr_list(f["/"], "layer_names")
            for k in ("keras_version", "backend"):
                if k in attrs:
                    meta[k] = attr_value(attrs[k])
            meta["layers"] = len(names)
            preferred += _keras2_order(f["/"], names)
            # transformers' TF models save Keras 2 weights named '<tf_model_class>/...:0'
            # (TFBertModel -> 'tf_bert_model/...'); its shards carry no keras_version
            firsts = {p.split("/")[1] if "/" in p else "" for p in preferred}
            hf = (
                "tf_model" in os.path.basename(self.path)
                or "keras_version" not in attrs
                or (bool(firsts) and all(x.startswith("tf_") for x in firsts))
            )
            kind = "hf-tf" if hf else "keras2"
            rest = set(keys) - layer_names_keys(f["/"]) - {"keras_version", "backend"}
        elif _looks_keras3(f, found):
            kind = "keras3"
            rest = set(keys)
            layers = f.get("layers")
            if layers is not None and hasattr(layers, "keys"):
                meta["layers"] = len(layers)
        else:
            kind = None
            rest = set(keys)
        for k in keys:
            if k in rest:
                # a name that is not UTF-8 comes as bytes from h5py: keyed as escapes, like other names
                mk = k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else k
                try:
                    meta[mk] = attr_value(attrs[k])
                except Exception:  # noqa: BLE001 - one unreadable attribute must not stop the listing
                    meta[mk] = "<unreadable attribute>"
        return kind, meta, preferred

    # -- data ----------------------------------------------------------------------------------
    def byte_range(self, name: str) -> tuple[str, int, int] | None:
        loc: _Loc = self.tensor_info(name).loc
        if loc.offset is None or is_remote(self.path):
            return None
        return (str(self.path), loc.offset, loc.length)

    def iter_chunks(self, name: str, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        t = self.tensor_info(name)
        loc: _Loc = t.loc
        if loc.length == 0:
            return
        if loc.offset is not None:
            try:
                yield from self._source().iter_range(loc.offset, loc.length, size)
            except CorruptFile as e:
                raise CorruptFile(f"dataset {loc.path}: {e.message}", self.path) from None
            return
        # by bytes: a name that was not UTF-8 in the file is a surrogate escape, which h5py
        # cannot encode as a str name
        ds = self._file()[loc.path.encode("utf-8", "surrogateescape")]
        try:
            yield from _slices(ds, t.shape, loc.np_dtype, size)
        except OSError as e:
            raise CorruptFile(f"dataset {loc.path}: cannot read its data ({_h5msg(e)})", self.path) from None


def _slices(ds, shape: tuple[int, ...], out_dt, size: int) -> Iterator[bytes]:
    """C-order bytes of a dataset, read by h5py slices of at most `size` bytes (one element min)."""
    import numpy as np

    item = out_dt.itemsize
    if not shape:
        yield np.ascontiguousarray(ds[()], dtype=out_dt).tobytes()
        return
    # split dimension d: the smallest d whose trailing block (one index of dim d) fits in size
    d = len(shape) - 1
    for i in range(len(shape)):
        if math.prod(shape[i + 1 :]) * item <= size:
            d = i
            break
    block = math.prod(shape[d + 1 :]) * item
    step = max(1, size // block) if block else shape[d]
    for outer in np.ndindex(*shape[:d]):
        for a in range(0, shape[d], step):
            b = min(shape[d], a + step)
            arr = ds[tuple(outer) + (slice(a, b),)]
            if arr.dtype != out_dt:
                arr = arr.astype(out_dt) if arr.dtype.kind != "V" else arr.view(out_dt)
            yield np.ascontiguousarray(arr).tobytes()


def _keras2_order(group, layer_names: list[str]) -> list[str]:
    """Dataset paths in a Keras 2 weight group, in layer_names then weight_names order."""
    out = []
    prefix = group.name.strip("/")
    prefix = prefix + "/" if prefix else ""
    for layer in layer_names:
        try:
            obj = group.get(layer)
        except UnicodeEncodeError:  # a name that was not UTF-8 in the attribute: h5py cannot look it up
            continue
        if obj is None:
            continue
        if not hasattr(obj, "keys"):  # transformers' sharded TF files: the name is the dataset
            out.append(prefix + layer)
            continue
        for w in _attr_list(obj, "weight_names"):
            out.append(f"{prefix}{layer}/{w}")
    return out


def _looks_keras3(f, paths) -> bool:
    """Keras 3 `.weights.h5`: every dataset at <object path>/vars/<i> (layers/..., optimizer/, vars/)."""
    top = set(f.keys())
    if not top & {"layers", "vars", "optimizer"}:
        return False
    return all(re.search(r"(^|/)vars/[^/]+$", p) for p in paths)


def _addr_id(oid, h5py):
    try:
        info = h5py.h5o.get_info(oid)
        return (info.fileno, info.addr)
    except Exception:  # noqa: BLE001
        return None


def _h5msg(e: BaseException) -> str:
    """h5py's message without its 'Unable to synchronously ...' boilerplate."""
    text = str(e) or type(e).__name__
    m = re.search(r"\((.*)\)\s*$", text)
    inner = m.group(1) if m else text
    return inner.replace("\n", " ")[:300]
