"""Discovery: walk a run folder, make a RunCheckpoint per checkpoint, enrich them (in forked
workers when many pickles need parsing), then fold last/best copies into aliases and resolve
the run's best pointers."""

from __future__ import annotations

import copy
import os
import stat
import sys
from pathlib import Path
from typing import Any, cast

from ckptctl.errors import CkptError, NotFound, UsageError
from ckptctl.ops.runs import layouts
from ckptctl.ops.runs.detect import (
    _checkpoint_layout,
    _is_checkpoint_file_name,
    is_checkpoint_dir,
)
from ckptctl.ops.runs.generic import _has_checkpoint_file
from ckptctl.ops.runs.model import Run, RunCheckpoint
from ckptctl.ops.runs.names import (
    FILE_SUFFIXES,
    INDEX_SUFFIXES,
    TMP_DIR,
    TMP_FILE,
)
from ckptctl.ops.runs.walk import (
    _file_stats,
    _read_json,
    _read_small_text,
    _walk_files,
    entry_path,
    is_remote,
    lexists,
    realpath,
    scandir,
)
from ckptctl.sources import as_path


# ---- discovery ---------------------------------------------------------------------------------
def discover(run_dir: str | os.PathLike, recursive: bool = False) -> list[RunCheckpoint]:
    """The checkpoints of a run folder, sorted by step (unknown last), then mtime."""
    return scan_run(run_dir, recursive=recursive).checkpoints


def scan_run(run_dir: str | os.PathLike, recursive: bool = False, read_info: bool = True) -> Run:
    """Discover a run: checkpoints, aliases, run-level best pointers, warnings.

    `run_dir` may also be one checkpoint (a file or a checkpoint folder): the run is then that
    one checkpoint, in its parent folder.
    """
    # a RemotePath (s3://...) stands in for a Path: it has the parts of Path's interface used here
    root = cast(Path, as_path(run_dir))
    if is_remote(root):
        folder = _remote_root(root)
    else:
        try:
            st = os.stat(root)
        except FileNotFoundError:
            if not layouts.names_checkpoint(root):  # run/ckpt-20 names a TF checkpoint by its prefix
                raise NotFound("no such file or directory", root) from None
            st = None
        except PermissionError:
            raise NotFound("permission denied", root) from None
        except OSError as e:
            raise NotFound(e.strerror or str(e), root) from None
        folder = st is not None and stat.S_ISDIR(st.st_mode)
    if not folder or is_checkpoint_dir(root):
        parent = root.parent
        run = Run(path=parent, checkpoints=[])
        c = _make_single(root, parent)
        if c is None:
            raise UsageError(f"not a checkpoint or a run folder (expected one of: {', '.join(FILE_SUFFIXES)})", root)
        run.checkpoints.append(c)
    else:
        run = Run(path=root, checkpoints=[])
        _scan_dir(root, root, run, recursive)
        _resolve_links(run, root)
    _enrich_all(run.checkpoints, read_info)
    _resolve_copies(run)
    if run.path == root:  # a run folder, not one checkpoint named on its own
        _resolve_best(run)
    run.checkpoints.sort(key=sort_key)
    return run


def _remote_root(root) -> bool:
    """True when a remote path is a folder (a prefix with objects under it), False when it names one
    checkpoint. One recursive listing of the prefix answers every later question about its folders."""
    from ckptctl.sources import prefetch_tree

    if root.protocol in ("http", "https"):
        if root.is_file():  # one HEAD
            return False
        raise CkptError(
            "http(s) has no listing, so a run folder cannot be listed there; name its checkpoint "
            "files (or use s3://, gs://, az://, hf://)",
            root,
        )
    if prefetch_tree(root):
        return True
    if root.is_file() or layouts.names_checkpoint(root):
        return False
    raise NotFound("no such object or prefix (nothing found under it)", root)


REMOTE_WORKERS = 16  # header reads in flight when the checkpoints are remote (latency-bound, not CPU)
PARALLEL_MIN = 24  # checkpoints that need a pickle parsed before a process pool pays off
POOL_STATE: dict[str, Any] = {"used": False, "error": None}  # what the last discovery did (for tests)


def _jobs() -> int:
    env = os.environ.get("CKPTCTL_JOBS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _enrich(c: RunCheckpoint, read_info: bool) -> None:
    """Step, epoch, metrics and (when read_info) the metadata of one checkpoint, by its layout."""
    layouts.for_layout(c.layout).enrich(c, read_info)


def _enrich_all(cks: list[RunCheckpoint], read_info: bool) -> None:
    """Read every checkpoint's step, metrics and info. Parsing pickles is CPU-bound pure Python
    (~3 ms for a Lightning .ckpt): with many of them, forked children share it across cores."""
    heavy = [
        c
        for c in cks
        if read_info
        and c.layout not in ("orbax", "tf")
        and (c.path.suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl") or c.layout in ("dcp", "deepspeed"))
    ]
    if cks and is_remote(cks[0].path):
        _enrich_threads(cks, read_info)
        return
    jobs = _jobs()
    if jobs < 2 or len(heavy) < PARALLEL_MIN or "torch" in sys.modules or not hasattr(os, "fork"):
        for c in cks:
            _enrich(c, read_info)
        return
    _fork_enrich(cks, heavy, jobs, read_info)


def _warm_imports() -> None:
    """The readers' modules, imported here before forking: once, not once in every child."""
    import ckptctl.formats.pickle_reader
    import ckptctl.formats.pickles
    import ckptctl.formats.safetensors
    import ckptctl.formats.torch_zip
    import ckptctl.ops.select  # noqa: F401 - what enrichment and the rows use afterwards


def _fork_enrich(cks: list[RunCheckpoint], heavy: list[RunCheckpoint], jobs: int, read_info: bool) -> None:
    """`jobs - 1` forked children and this process share the heavy checkpoints (this one also
    takes the light ones and reads the children's results, so it takes a smaller share). A child
    sends its checkpoints back through a pipe, pickled, tensors as plain tuples; whatever a child
    does not send back (it failed, was killed, the fork failed) is read here instead."""
    import pickle

    _warm_imports()
    n = len(heavy)
    mine = max(0, n // jobs - n // (jobs * 6))  # this process's share: a sixth less than a child's
    rest = heavy[mine:]
    per = -(-len(rest) // (jobs - 1))
    shares = [rest[i : i + per] for i in range(0, len(rest), per)]
    children: list[tuple[int, int, list[RunCheckpoint]]] = []  # (pid, read end, share)
    error = None
    for share in shares:
        try:
            r, w = os.pipe()
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
            break
        try:
            pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            error = f"{type(e).__name__}: {e}"
            break
        if pid == 0:  # the child: its share, sent back, then gone without running any exit handler
            code = 1
            try:
                os.close(r)
                import gc

                gc.disable()  # a short-lived process: nothing to gain from collecting
                try:
                    payload = pickle.dumps(("ok", _enrich_share(share)), protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as e:  # noqa: BLE001 - reported to the parent, which redoes the share
                    payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
                with os.fdopen(w, "wb") as out:
                    out.write(payload)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        children.append((pid, r, share))
    todo = heavy[:mine] + [c for share in shares[len(children) :] for c in share]
    heavy_ids = {id(c) for c in heavy}
    for c in cks:  # this process's share and the light ones, meanwhile
        if id(c) not in heavy_ids:
            _enrich(c, read_info)
    for c in todo:
        _enrich(c, read_info)
    used = bool(children)
    for pid, r, share in children:
        try:
            with os.fdopen(r, "rb") as f:
                raw = f.read()
        except OSError as e:
            raw, error = b"", f"{type(e).__name__}: {e}"
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        status, results = ("error", "a worker ended without its results") if not raw else pickle.loads(raw)
        if status != "ok":
            error, used = str(results), False
            for c in share:
                _enrich(c, read_info)
            continue
        for c, state in zip(share, results):
            _receive(c, state)
    POOL_STATE.update(used=used and error is None, error=error)


def _enrich_share(share: list[RunCheckpoint]) -> list[dict[str, Any]]:
    """In a child: each checkpoint enriched, as the attributes to send back. `TensorInfo.loc` is
    reader-private (it holds the open archive): the tensors go as (name, dtype, shape, nbytes,
    alias_of) tuples, cheaper to pickle and to rebuild than the objects."""
    out = []
    for c in share:
        _enrich(c, True)
        state = dict(c.__dict__)
        state.pop("_model_cache", None)  # RunCheckpoint's cache: rebuilt in the parent if asked
        info = c.info
        if info is not None:
            info = state["info"] = copy.copy(info)
            info.tensors = [(t.name, t.dtype, t.shape, t.nbytes, t.alias_of) for t in info.tensors]  # type: ignore[misc]
        out.append(state)
    return out


def _receive(c: RunCheckpoint, state: dict[str, Any]) -> None:
    """In the parent: a checkpoint's attributes as a child sent them, its tensors rebuilt."""
    from ckptctl.formats.pickle_reader import new_tensor_info

    info = state.get("info")
    if info is not None:
        info.tensors = [new_tensor_info(n, d, s, b, a, None) for n, d, s, b, a in info.tensors]
    c.__dict__.update(state)


def _enrich_threads(cks: list[RunCheckpoint], read_info: bool) -> None:
    """Remote checkpoints: each needs a request or two (a header, a pickle's head, a side file)
    whose time is the server's latency, so they are all in flight together, REMOTE_WORKERS at once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(REMOTE_WORKERS, len(cks)))) as pool:
        for _ in pool.map(lambda c: _enrich(c, read_info), cks):
            pass


def sort_key(c: RunCheckpoint):
    return (
        c.step is None,
        c.step if c.step is not None else 0,
        c.epoch is None,
        c.epoch or 0,
        c.mtime,
        os.fspath(c.path),
    )


def _make_single(path: Path, run: Path) -> RunCheckpoint | None:
    if layouts.names_checkpoint(path):  # run/ckpt-20, ckpt-20.index, ckpt-20.data-00000-of-00001
        return layouts.single(path)
    if path.is_dir():
        layout = _checkpoint_layout(path)
        if layout is None:
            return None
        return _dir_checkpoint(path, run, layout)
    if path.name.endswith(INDEX_SUFFIXES):
        return _index_checkpoint(path, run, set())
    return _file_checkpoint(path, run)


def _scan_dir(folder: Path, root: Path, run: Run, recursive: bool) -> None:
    try:
        entries = sorted(scandir(folder), key=lambda e: e.name)
    except PermissionError:
        raise NotFound("permission denied", folder) from None
    except OSError as err:
        raise NotFound(err.strerror or str(err), folder) from None
    names = [e.name for e in entries]
    claimed: set[str] = set()
    links: list[os.DirEntry] = []
    alias_files: list[Path] = []
    # 1. sharded models at this level: the index claims its shards
    for e in entries:
        if e.name.endswith(INDEX_SUFFIXES) and e.is_file(follow_symlinks=False):
            c = _index_checkpoint(entry_path(e), folder, claimed, run.warnings)
            if c is not None:
                run.checkpoints.append(c)
    # 2. groups of loose files a layout claims (TF prefixes: ckpt-5.index + ckpt-5.data-00000-of-00001)
    for lay in layouts.LAYOUTS:
        lay.scan(folder, names, claimed, run)
    # 3. everything else
    for e in entries:
        n = e.name
        if n in claimed:
            continue
        p = entry_path(e)
        if e.is_symlink():
            links.append(e)
            continue
        if e.is_dir(follow_symlinks=False):
            layout = _checkpoint_layout(p)
            if layout is not None or (TMP_DIR.match(n) and _has_checkpoint_file(p)):
                run.checkpoints.append(_dir_checkpoint(p, folder, layout or "folder"))
            elif recursive and not n.startswith(".") and n not in ("__pycache__", "node_modules"):
                _scan_dir(p, root, run, recursive)
            elif not n.startswith("."):
                run.subdirs.append(p)
            continue
        if not e.is_file(follow_symlinks=False):
            continue
        if n in layouts.ALIAS_FILES:  # `latest` (DeepSpeed), TF `checkpoint`, Megatron's iteration file
            alias_files.append(p)
            continue
        if TMP_FILE.search(n) and _is_checkpoint_file_name(TMP_FILE.sub("", n).lstrip(".")):
            c = _file_checkpoint(p, folder)
            c.incomplete = True
            c.error = "incomplete: a temporary file of a save in progress or interrupted"
            run.checkpoints.append(c)
            continue
        if _is_checkpoint_file_name(n):
            run.checkpoints.append(_file_checkpoint(p, folder))
        elif n.endswith(FILE_SUFFIXES):
            run.ignored.append(p)
    run.links.extend(entry_path(e) for e in links)
    run.alias_files.extend(alias_files)


def _resolve_links(run: Run, root: Path) -> None:
    real_root = realpath(root)
    by_real = {realpath(c.path): c for c in run.checkpoints}
    for link in run.links:
        target = os.path.realpath(link)
        if target in by_real:
            by_real[target].aliases.append(link.name)
            continue
        try:
            shown = os.readlink(link)
        except OSError:
            shown = "?"
        if not os.path.exists(target):
            run.warnings.append(f"{link}: dangling symlink (-> {shown}); ignored")
        elif not (target == real_root or target.startswith(real_root + os.sep)):
            run.warnings.append(f"{link}: symlink to outside the run folder (-> {shown}); not listed")
        elif _is_checkpoint_file_name(link.name) or os.path.isdir(target):
            run.warnings.append(f"{link}: symlink to {shown}, which is not a listed checkpoint")
    for f in run.alias_files:
        text = _read_small_text(f, 4096)
        if not text:
            continue
        target_name = layouts.ALIAS_FILES[f.name].alias_target(f.name, text)
        if not target_name or "\n" in target_name:
            continue
        target = realpath(f.parent / target_name)
        if target in by_real:
            by_real[target].aliases.append(f.name)


def _file_checkpoint(path: Path, run: Path) -> RunCheckpoint:
    mtime, size = _file_stats([path])
    layout = layouts.claim_file(path.name)  # lightning, keras, fairseq, ... else "file"
    return RunCheckpoint(
        path=path,
        files=[path],
        step=None,
        step_source="none",
        format=None,
        size=size,
        mtime=mtime,
        run=run,
        layout=layout,
    )


def _index_checkpoint(
    index: Path, folder: Path, claimed: set[str], warnings: list[str] | None = None
) -> RunCheckpoint | None:
    doc = _read_json(index, 64 << 20)
    files = [index]
    claimed.add(index.name)
    if isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict):
        for shard in sorted(set(map(str, doc["weight_map"].values()))):
            if os.path.isabs(shard) or ".." in Path(shard).parts:
                continue
            p = folder / shard
            if lexists(p):
                files.append(p)
                if len(Path(shard).parts) == 1:
                    claimed.add(shard)
    mtime, size = _file_stats(files)
    return RunCheckpoint(
        path=index,
        files=files,
        step=None,
        step_source="none",
        format=None,
        size=size,
        mtime=mtime,
        run=folder,
        layout="keras" if index.name.endswith(".weights.json") else "sharded",
    )


def _dir_checkpoint(path: Path, run: Path, layout: str) -> RunCheckpoint:
    files, dirs, mtime, size = _walk_files(path)
    c = RunCheckpoint(
        path=path,
        files=files,
        step=None,
        step_source="none",
        format=None,
        size=size,
        mtime=mtime,
        run=run,
        layout=layout,
        dirs=dirs,
    )
    names = {f.name for f in files if f.parent == path}
    if TMP_DIR.match(path.name):
        c.incomplete = True
        c.error = "incomplete: a temporary folder of a save in progress or interrupted"
    elif (why := layouts.for_layout(layout).incomplete(c, names)) is not None:
        c.incomplete = True
        c.error = why
    elif not files:
        c.incomplete = True
        c.error = "incomplete: empty folder"
    return c


# ---- copies and bests --------------------------------------------------------------------------
def _resolve_copies(run: Run) -> None:
    """checkpoint_last.pt / last.ckpt / checkpoint_best.pt: aliases when they equal a stepped one."""
    keep: list[RunCheckpoint] = []
    stepped = [c for c in run.checkpoints if layouts.role_of(c.path.name) is None]
    for c in run.checkpoints:
        role = layouts.role_of(c.path.name) if len(c.files) == 1 else None
        if role is None:
            keep.append(c)
            continue
        twin = None
        if c.step is not None and c.error is None:
            for s in stepped:
                if s.run == c.run and s.step == c.step and s.size == c.size and s.error is None and len(s.files) == 1:
                    twin = s
                    break
        if twin is None:  # best.keras: a byte copy of one epoch's file?
            twin = layouts.for_layout(c.layout).twin(c, stepped)
        if twin is not None:
            twin.aliases.append(c.path.name)
            twin.aliases.extend(c.aliases)
            twin.copies.extend(c.files + c.copies)
            run.ignored.append(c.path)
        else:
            c.role = role
            keep.append(c)
    run.checkpoints = keep


def _resolve_best(run: Run) -> None:
    """The run's best checkpoint as the newest trainer state / Lightning callback names it."""
    by_run: dict[Path | None, list[RunCheckpoint]] = {}
    for c in run.checkpoints:
        by_run.setdefault(c.run, []).append(c)
    for group in by_run.values():
        refs = [c for c in group if c.best_ref]
        if not refs:
            continue
        newest = max(refs, key=lambda c: (c.step is not None, c.step or 0, c.mtime))
        ref = newest.best_ref or {}
        target = _match_path(ref.get("path", ""), group)
        run.best.append((ref.get("source", "best"), target.path if target else None))
        if target is not None:
            target.best_of_run.append(ref.get("source", "best"))
        else:
            run.notes.append(
                f"{newest.path.name}: {ref.get('source')} names {ref.get('path')!r}, which is not in this run "
                "folder; nothing protected for it"
            )


def _match_path(ref: str, group: list[RunCheckpoint]) -> RunCheckpoint | None:
    if not ref:
        return None
    ref_path = Path(ref)
    for c in group:  # exact path first (absolute or relative to the current folder)
        try:
            if os.path.realpath(ref_path) == realpath(c.path):
                return c
        except OSError:
            pass
    hits = [c for c in group if c.path.name == ref_path.name]
    return hits[0] if len(hits) == 1 else None
