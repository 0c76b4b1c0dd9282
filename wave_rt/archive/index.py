"""`wave_rt.Index`: a FAISS index over the shards of an archive directory, and search by vector or by item.

    index = wave_rt.Index.build("clips_emb/", kind="hnsw")      # saved as clips_emb/index-hnsw.faiss
    hits = index.search_items(["a dog barks"], k=5)[0]          # encodes with the archive's own model
    for h in hits: print(h.rank, h.score, h.id, h.path)

Scores are cosine similarities: vectors are L2-normalized before they enter the index and queries
before they are searched (inner-product metric). Kinds: `flat` (exact, FAISS), `flat-gpu` (exact, the
vectors as one torch tensor searched by wave_rt.kernels.similarity_topk: fp16 in GPU memory on CUDA, or
streamed from pinned host memory when they do not fit; float32 through the kernels' torch path on a CPU),
`ivf` (IVF-Flat, trained on a strided sample of the whole archive, since shards are grouped by length),
`hnsw` (HNSW-Flat, CPU only). Exact kinds break ties by the lower row. `exact_kind()` is the exact kind the
CLI picks: `flat-gpu` on a CUDA machine, FAISS `flat` elsewhere. FAISS (CPU and ANN kinds) is imported
lazily; without it the error names the pip command. `flat-gpu` saves only index.json: its vectors are
read from the shards when it loads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wave_rt.archive.errors import ArchiveFormatError, ArchiveMismatchError
from wave_rt.archive.journal import committed_shards
from wave_rt.archive.manifest import RunManifest, atomic_write_text, read_manifest
from wave_rt.archive.shards import META_COLUMNS

KINDS = ("flat", "flat-gpu", "ivf", "hnsw")
INDEX_META = "index.json"


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
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
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
    import importlib.util

    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("faiss") is None:
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
        FAISS `flat` elsewhere (the same results)."""
        root = Path(out_dir)
        manifest = _manifest(root)
        shards = _shards(root)
        meta_path = root / INDEX_META
        if meta_path.exists():
            info = json.loads(meta_path.read_text(encoding="utf-8"))
            wanted = kind or info.get("kind")
            current = [list(s) for s in shards] == info.get("shards") and info.get("config_hash") == manifest.config_hash
            if current and kind is None and wanted in ("flat", "flat-gpu") and "flat-gpu" in (wanted, exact_kind()):
                return cls.build(root, exact_kind(), save=False)  # exact either way: the machine's exact kind
            if current and wanted == "flat-gpu":
                return cls.build(root, "flat-gpu", save=False)
            file = root / f"index-{wanted}.faiss"
            if current and wanted == info.get("kind") and file.exists():
                faiss = _faiss()
                index = faiss.read_index(str(file))
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
        if self.kind == "flat-gpu":
            atomic_write_text(self.out_dir / INDEX_META, json.dumps(info, indent=2) + "\n")
            return self.out_dir / INDEX_META
        faiss = _faiss()
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and _gpu_count(faiss) > 0 and self.kind in ("flat", "ivf"):
            index = faiss.index_gpu_to_cpu(index)
        file = self.out_dir / f"index-{self.kind}.faiss"
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, file)
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

    def _checked(self, enc: Any) -> Any:
        if str(enc.fingerprint) != self.manifest.config_hash:
            raise ArchiveMismatchError(self.out_dir, {"config_hash": (self.manifest.config_hash, str(enc.fingerprint))})
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


def _manifest(root: Path) -> RunManifest:
    m = read_manifest(root)
    if m is None:
        raise ArchiveFormatError(root, "is not an archive directory (no manifest.json)")
    return m


def _read_meta(root: Path, shards: list[tuple[str, int]]) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(root / name, columns=list(META_COLUMNS)) for name, _ in shards]
    return pa.concat_tables(tables).combine_chunks() if tables else None
