"""`wave_rt.Index`: a FAISS index over the shards of an archive directory, and search by vector or by item.

    index = wave_rt.Index.build("clips_emb/", kind="hnsw")      # saved as clips_emb/index-hnsw.faiss
    hits = index.search_items(["a dog barks"], k=5)[0]          # encodes with the archive's own model
    for h in hits: print(h.rank, h.score, h.id, h.path)

Scores are cosine similarities: vectors are L2-normalized before they enter the index and queries
before they are searched (inner-product metric). Kinds: `flat` (exact, FAISS), `flat-gpu` (exact, the
vectors as one torch tensor searched by wave_rt.kernels.similarity_topk: fp16 in GPU memory on CUDA, or
streamed from pinned host memory when they do not fit; float32 through the kernels' torch path on a CPU),
`ivf` (IVF-Flat, trained on a strided sample of the whole archive, since shards are grouped by length),
`hnsw` (HNSW-Flat, CPU only). Exact kinds break ties by the lower row, also at the k-th place (of rows
0..9 tied, k=3 returns 0, 1, 2): FAISS leaves the order of equal scores open, so `flat` asks it for one row
past k, widens the search while the tie crosses the cut and sorts by (-score, row). ANN kinds (`ivf`,
`hnsw`) return ties in FAISS's order: which of several equal rows an approximate search finds is open anyway.
`exact_kind()` is the exact kind the CLI picks: `flat-gpu` on a CUDA machine, FAISS `flat` elsewhere. FAISS
(CPU and ANN kinds) is imported lazily; without it the error names the pip command, except when `load()`
meets a saved FAISS index: it logs a warning and searches exactly instead. `flat-gpu` saves only index.json:
its vectors are read from the shards when it loads. Damaged files (index.json, a saved index, a shard)
raise ArchiveFormatError naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wave_rt.archive.errors import ArchiveFormatError, IndexOptionsError, SearchMismatchError
from wave_rt.archive.journal import committed_shards
from wave_rt.archive.manifest import (
    RunManifest,
    atomic_write_text,
    exclusive_lock,
    read_manifest,
    remove_temp_files_of,
    temp_path,
)
from wave_rt.archive.shards import META_COLUMNS, read_columns
from wave_rt.errors import MissingDependencyError

KINDS = ("flat", "flat-gpu", "ivf", "hnsw")
INDEX_META = "index.json"
# Saves hold this lock (not the job's: indexing while a job appends is allowed), so that one save can clear
# the temp files a killed save left without touching those of a save in progress.
INDEX_LOCK = ".index.lock"
FAISS_GPU_MAX_K = 2048  # GPU FAISS refuses a larger k (GPU_MAX_SELECTION_K)

log = logging.getLogger(__name__)


def _faiss() -> Any:
    from wave_rt._optional import require

    return require("faiss", "wave_rt.Index")


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: str
    path: str | None
    modality: str
    text: str | None
    duration: float | None
    position: int  # row number in the index (shard order)


def _shards(out_dir: Path) -> list[tuple[str, int]]:
    # read-only (a job may be writing): part-*.parquet files are complete by construction
    return [(s.name, s.rows) for s in committed_shards(out_dir)]


def _embeddings(path: Path) -> np.ndarray:
    col = read_columns(path, ["embedding"]).column("embedding").combine_chunks()
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(-1, dim), dtype=np.float32)


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def exact_kind() -> str:
    """The exact index this machine searches with: `flat-gpu` (FlatTorchIndex, similarity_topk) where CUDA is
    available, FAISS `flat` on a CPU with faiss installed, else FlatTorchIndex on the CPU (the same scores as
    FAISS flat): searching an archive never needs the optional faiss package, building an ANN index does."""
    import torch

    from wave_rt._optional import available

    # available(), not find_spec: an installed faiss that fails to import must not be picked either
    if torch.cuda.is_available() or not available("faiss"):
        return "flat-gpu"
    return "flat"


class FlatTorchIndex:
    """Exact inner-product search over normalized rows held as one torch tensor, answered by
    wave_rt.kernels.similarity_topk (ties to the lower row). The FAISS-like surface (`ntotal`, `search`)
    lets Index treat it like the FAISS kinds.

    On CUDA the rows are fp16 in GPU memory (scores accumulate in fp32), or pinned host memory streamed
    to the GPU chunk by chunk when they would leave less than `headroom` bytes free; on a CPU they are
    float32 and similarity_topk takes its streamed torch path (the same scores as FAISS flat)."""

    def __init__(self, dim: int, rows: int, device: Any = None, headroom: int = 2 << 30) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        storage = self.device
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if rows * dim * 2 > free - headroom:
                storage = torch.device("cpu")
        self.vectors = torch.empty((rows, dim), dtype=self.dtype, device=storage,
                                   pin_memory=storage.type == "cpu" and self.device.type == "cuda")
        self.ntotal = 0

    @property
    def resident(self) -> bool:
        """True when the rows sit in the memory of the device that searches them."""
        return self.vectors.device.type == self.device.type

    def add(self, x: Any) -> None:
        """Append normalized rows (numpy, or a torch tensor on any device)."""
        import torch

        rows = torch.as_tensor(x)
        n = rows.shape[0]
        self.vectors[self.ntotal:self.ntotal + n] = rows.to(device=self.vectors.device, dtype=self.dtype)
        self.ntotal += n

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from wave_rt.kernels import similarity_topk

        q = torch.from_numpy(np.ascontiguousarray(queries)).to(device=self.device, dtype=self.dtype)
        values, indices = similarity_topk(q, self.vectors[:self.ntotal], k, normalize=False)
        return values.cpu().numpy(), indices.cpu().numpy()


def _on_gpu(index: Any) -> bool:
    return type(index).__name__.startswith("Gpu") or type(index).__name__ == "IndexReplicas"


def _flat_search_lower_row_first(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS flat search with equal scores ordered by the lower row, as the exact kinds promise.

    FAISS's heaps leave the order of equal scores open (CPU flat returns them highest row first), and with
    it which of several rows tied at the k-th place make the cut. One row past k shows whether a tie
    crosses the cut; only such a query is searched again, wider until a lower score ends the tie (or every
    row is in), so the common case costs no more than the plain search. Sorting by (-score, row) then
    settles the order."""
    n = int(index.ntotal)
    limit = min(n, FAISS_GPU_MAX_K) if _on_gpu(index) else n
    first = k + 1 if k < limit else k
    scores, rows = index.search(queries, first)
    order = np.lexsort((rows, -scores), axis=-1)
    scores, rows = np.take_along_axis(scores, order, -1), np.take_along_axis(rows, order, -1)
    out_s, out_r = scores[:, :k].copy(), rows[:, :k].copy()
    if first == k:
        return out_s, out_r
    for i in np.flatnonzero(scores[:, k] == scores[:, k - 1]):
        s, r, width = scores[i], rows[i], first
        while width < limit and s[-1] == s[k - 1]:
            width = min(limit, 4 * width)  # each try is a full scan: grow fast through long runs of copies
            found_s, found_r = index.search(queries[i:i + 1], width)
            order = np.lexsort((found_r[0], -found_s[0]))
            s, r = found_s[0][order], found_r[0][order]
        out_s[i], out_r[i] = s[:k], r[:k]
    return out_s, out_r


def _gpu_count(faiss: Any) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


class Index:
    def __init__(self, out_dir: str | os.PathLike[str], index: Any, meta: Any, kind: str,
                 manifest: RunManifest, shards: list[tuple[str, int]], params: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.index = index
        self.meta = meta  # pyarrow Table: id, path, modality, duration, text, instruction (index order)
        self.kind = kind
        self.manifest = manifest
        self.shards = shards
        self.params = dict(params or {})  # nlist / nprobe / efSearch
        self._encoder: Any = None
        self._apply_params()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, out_dir: str | os.PathLike[str], kind: str = "flat", *, nlist: int | None = None,
              nprobe: int | None = None, hnsw_m: int = 32, use_gpu: bool | None = None, save: bool = True) -> Index:
        """Index every committed shard of `out_dir`; with save=True also write index-<kind>.faiss + index.json."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        root = Path(out_dir)
        manifest = _manifest(root)
        shards = _shards(root)
        total = sum(n for _, n in shards)
        if total == 0:
            raise ArchiveFormatError(root, "has no embedded rows to index")
        dim = manifest.dim
        if kind == "flat-gpu":
            flat = FlatTorchIndex(dim, total)
            for name, _ in shards:
                flat.add(_normalized(_embeddings(root / name)))
            obj = cls(root, flat, _read_meta(root, shards), kind, manifest, shards)
            if save:
                obj.save()
            return obj
        faiss = _faiss()
        gpu = (_gpu_count(faiss) > 0) if use_gpu is None else use_gpu
        params: dict[str, Any] = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            params["efSearch"] = 64
            gpu = False  # FAISS has no GPU HNSW
        else:
            if nlist is not None and not 1 <= nlist <= total:
                # FAISS would fail with a C++ assertion: k-means needs a training row per list
                raise IndexOptionsError(root, "nlist", nlist, f"must be between 1 and the number of rows "
                                                              f"({total:,}): IVF trains one centroid per list")
            n_list = nlist or max(1, min(int(4 * math.sqrt(total)), total // 39 or 1))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, n_list, faiss.METRIC_INNER_PRODUCT)
            index.train(cls._training_sample(root, shards, total, max(256 * n_list, 39 * n_list)))
            params["nlist"] = n_list
            params["nprobe"] = int(nprobe or min(n_list, max(8, n_list // 8)))
        if gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        for name, _ in shards:
            index.add(_normalized(_embeddings(root / name)))
        obj = cls(root, index, _read_meta(root, shards), kind, manifest, shards, params)
        if save:
            obj.save()
        return obj

    @staticmethod
    def _training_sample(root: Path, shards: list[tuple[str, int]], total: int, want: int) -> np.ndarray:
        stride = max(1, total // max(1, want))
        picks = []
        offset = 0
        for name, n in shards:
            first = (-offset) % stride
            if first < n:
                picks.append(_normalized(_embeddings(root / name)[first::stride]))
            offset += n
        return np.concatenate(picks)

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str], kind: str | None = None) -> Index:
        """The saved index when it covers exactly the archive's current shards; otherwise an exact index
        (`exact_kind()`) built in memory (nothing written). A saved exact index (`flat` or `flat-gpu`) is
        searched with this machine's exact kind unless `kind` asks for one: `flat-gpu` on a CUDA machine,
        FAISS `flat` elsewhere (the same results). Without faiss, a saved FAISS index is skipped with a
        warning (exact search instead) unless `kind` asks for it."""
        root = Path(out_dir)
        manifest = _manifest(root)
        shards = _shards(root)
        meta_path = root / INDEX_META
        if meta_path.exists():
            info = _read_index_meta(meta_path)
            wanted = kind or info.get("kind")
            current = [list(s) for s in shards] == info.get("shards") and info.get("config_hash") == manifest.config_hash
            if current and kind is None and wanted in ("flat", "flat-gpu") and "flat-gpu" in (wanted, exact_kind()):
                return cls.build(root, exact_kind(), save=False)  # exact either way: the machine's exact kind
            if current and wanted == "flat-gpu":
                return cls.build(root, "flat-gpu", save=False)
            file = root / f"index-{wanted}.faiss"
            if current and wanted == info.get("kind") and file.exists():
                try:
                    faiss = _faiss()
                except MissingDependencyError as exc:
                    if kind is not None:
                        raise
                    # searching never needs faiss: the exact torch index gives the exact answer
                    log.warning("%s: skipping the saved %s index (faiss is not installed: %s); searching with "
                                "the exact torch index instead", file, wanted, exc.pip_install)
                    return cls.build(root, "flat-gpu", save=False)
                try:
                    index = faiss.read_index(str(file))
                except RuntimeError as exc:
                    raise ArchiveFormatError(file, f"unreadable FAISS index ({' '.join(str(exc).split())}); "
                                                   f"rebuild it with `wave-rt index {root} --kind {wanted}`, "
                                                   "or delete it to search exactly") from None
                if _gpu_count(faiss) > 0 and wanted in ("flat", "ivf"):
                    index = faiss.index_cpu_to_all_gpus(index)
                return cls(root, index, _read_meta(root, shards), wanted, manifest, shards, info.get("params"))
        return cls.build(root, kind or exact_kind(), save=False)

    def save_path(self) -> Path:
        """The file that holds this index once saved (flat-gpu: index.json)."""
        return self.out_dir / (INDEX_META if self.kind == "flat-gpu" else f"index-{self.kind}.faiss")

    def save(self) -> Path:
        """index-<kind>.faiss + index.json (flat-gpu: index.json only; its vectors are the shards')."""
        info = {"kind": self.kind, "rows": len(self), "shards": [list(s) for s in self.shards],
                "config_hash": self.manifest.config_hash, "params": self.params}
        with exclusive_lock(self.out_dir / INDEX_LOCK):
            removed = remove_temp_files_of(self.out_dir, [INDEX_META] + [f"index-{k}.faiss" for k in KINDS])
            if removed:
                log.info("%s: removed %d temp file(s) of an interrupted index save", self.out_dir, removed)
            if self.kind == "flat-gpu":
                atomic_write_text(self.out_dir / INDEX_META, json.dumps(info, indent=2) + "\n")
                return self.out_dir / INDEX_META
            faiss = _faiss()
            index = self.index
            if hasattr(faiss, "index_gpu_to_cpu") and _gpu_count(faiss) > 0 and self.kind in ("flat", "ivf"):
                index = faiss.index_gpu_to_cpu(index)
            file = self.out_dir / f"index-{self.kind}.faiss"
            tmp = temp_path(file)
            try:
                faiss.write_index(index, str(tmp))
                os.replace(tmp, file)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk must not leave an index-sized temp file behind
                raise
            atomic_write_text(self.out_dir / INDEX_META, json.dumps(info, indent=2) + "\n")
            return file

    def _apply_params(self) -> None:
        params = self.params
        if not params:
            return
        faiss = _faiss()
        if "nprobe" in params:
            try:
                faiss.extract_index_ivf(self.index).nprobe = int(params["nprobe"])
            except (RuntimeError, AttributeError):
                self.index.nprobe = int(params["nprobe"])
        if "efSearch" in params and hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = int(params["efSearch"])

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.manifest.dim)

    def row(self, position: int) -> dict[str, Any]:
        return {name: self.meta.column(name)[position].as_py() for name in META_COLUMNS}

    def embeddings(self) -> np.ndarray:
        """All vectors in index order, normalized (float32 [N, dim]); reads the shards."""
        return np.concatenate([_normalized(_embeddings(self.out_dir / name)) for name, _ in self.shards])

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 10) -> list[list[Hit]]:
        """Nearest rows of each query vector ([dim] or [q, dim], numpy or torch), best first."""
        q = np.asarray(queries.detach().cpu() if hasattr(queries, "detach") else queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}], got {tuple(q.shape)}")
        if k <= 0:
            raise ValueError("k must be positive")
        k = min(k, len(self))
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(int(self.params.get("efSearch", 64)), k)
        if self.kind == "flat":
            scores, positions = _flat_search_lower_row_first(self.index, _normalized(q), k)
        else:
            scores, positions = self.index.search(_normalized(q), k)
        out = []
        for srow, prow in zip(scores, positions):
            hits = []
            for rank, (s, p) in enumerate(((s, p) for s, p in zip(srow, prow) if p >= 0), start=1):
                r = self.row(int(p))
                hits.append(Hit(rank, float(s), r["id"], r["path"], r["modality"], r["text"], r["duration"], int(p)))
            out.append(hits)
        return out

    def encoder(self, device: Any = None) -> Any:
        """The archive's own model (checked against the manifest's config hash), loaded once."""
        if self._encoder is None:
            from wave_rt.embed.encoder import WaveEncoder

            ref = self.manifest.model_path
            if ref.startswith("<encoder"):
                raise ArchiveFormatError(self.out_dir, "was embedded with an in-memory encoder; pass encoder= "
                                                       "to search_items")
            enc = WaveEncoder.from_pretrained(None if ref == "demo" else ref, device=device,
                                              dtype=self.manifest.dtype)
            self._encoder = self._checked(enc)
        return self._encoder

    def check_dtype(self, dtype: Any) -> None:
        """Refuse a query dtype other than the archive's before a model is loaded in it."""
        from wave_rt.dtypes import dtype_name

        if dtype is not None and dtype_name(dtype) != self.manifest.dtype:
            raise self._mismatch({"dtype": (self.manifest.dtype, dtype_name(dtype))})

    def _mismatch(self, differences: dict[str, tuple[Any, Any]]) -> SearchMismatchError:
        m = self.manifest
        return SearchMismatchError(self.out_dir, differences, model_id=m.model_id, model_path=m.model_path,
                                   dtype=m.dtype)

    def _checked(self, enc: Any) -> Any:
        if str(enc.fingerprint) != self.manifest.config_hash:
            from wave_rt.dtypes import dtype_name

            m = self.manifest
            # the hash covers weights, config and dtype: name the parts a user can change first
            diff: dict[str, tuple[Any, Any]] = {}
            dtype = getattr(enc, "dtype", None)
            if dtype is not None and dtype_name(dtype) != m.dtype:
                diff["dtype"] = (m.dtype, dtype_name(dtype))
            if str(getattr(enc, "model_id", m.model_id)) != m.model_id:
                diff["model_id"] = (m.model_id, str(enc.model_id))
            if not diff:  # the same name and dtype, other weights or config
                diff["config_hash"] = (m.config_hash, str(enc.fingerprint))
            raise self._mismatch(diff)
        return enc

    def search_items(self, items: Sequence[Any] | Any, k: int = 10, instruction: str | None = None,
                     encoder: Any = None) -> list[list[Hit]]:
        """Encode query items (str, Text, Audio, Video, AudioVisual) with the archive's model and search.
        A plain str is encoded as WAVE encodes text (no head, no instruction); with `instruction`, strings
        become wave_rt.Text(s, side="query") so the instruction steers them."""
        from wave_rt.items import Text

        enc = self._checked(encoder) if encoder is not None else self.encoder()
        seq = [items] if isinstance(items, str) or not isinstance(items, Sequence) else list(items)
        if instruction is not None:
            seq = [Text(s, side="query") if isinstance(s, str) else s for s in seq]
        vectors = enc.encode(seq, instruction=instruction, convert_to="numpy")
        return self.search(vectors, k)


def _read_index_meta(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveFormatError(path, f"unreadable index metadata ({exc}); rebuild the index with "
                                       f"`wave-rt index {path.parent}`, or delete {path.name}") from None
    if not isinstance(info, dict):
        raise ArchiveFormatError(path, "not index metadata (a JSON object is expected); rebuild the index with "
                                       f"`wave-rt index {path.parent}`, or delete {path.name}")
    return info


def _manifest(root: Path) -> RunManifest:
    m = read_manifest(root)
    if m is None:
        raise ArchiveFormatError(root, "is not an archive directory (no manifest.json)")
    return m


def _read_meta(root: Path, shards: list[tuple[str, int]]) -> Any:
    import pyarrow as pa

    tables = [read_columns(root / name, list(META_COLUMNS)) for name, _ in shards]
    return pa.concat_tables(tables).combine_chunks() if tables else None
