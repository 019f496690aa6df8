"""The similarity store: the single seam between gradients and every analysis.

Per query setting, one HDF5 file holds, for each component c, the dot products between every
query gradient and every training gradient and both sides' squared norms. The cosine of any
component subset S then follows exactly, without touching a gradient again:
    cos_S(q, t) = sum_{c in S} dot[c, q, t] / sqrt(sum_{c in S} query_sqnorm[c, q] * sum_{c in S} train_sqnorm[c, t])

File format (tdabench-similarity/1):
    components        string [C]      component names, model order
    component_params  int64  [C]      parameters per component
    component_family  string [C]      optional: e.g. "q", "down", "embed"
    component_layer   int64  [C]      optional: decoder layer, -1 for none
    component_dim     int64  [C]      optional: stored gradient dimension (a count-sketch size when
                                      the component was capped); defaults to component_params
    component_method  string [C]      optional: "exact" or "countsketch" (of component_dim dims)
    component_way     string [C]      optional: how the dots were computed: "cache" (from a gradient
                                      store), "materialised" or "factored" (streamed from the model)
    query_ids         string [Q]
    train_ids         string [T]
    ground_truth      int64  [Q]      index into train_ids of each query's source example
    query_sqnorm      float  [C, Q]
    train_sqnorm      float  [C, T]
    dot               float  [C, Q, T]   dense layout: every query against every training example
  or, for the candidate protocol:
    candidates        int64  [Q, b]   indices into train_ids, in ranking order
    dot               float  [C, Q, b]   for those pairs only
    attrs (all optional): format, setting, model_fingerprint, source ("cache" | "stream"), layout
        ("dense" | "candidates")

This module is the format only: reading, checking, writing, merging. The numbers come from a
producer (tdabench.producer: `CacheProducer` from stored gradients, `StreamProducer` from the
model), which writes through `SimilarityWriter`: a partial file with a `done` mask per unit of
work, resumed by a rerun with the same header (streamed stores), sealed and renamed when
complete. Jobs over disjoint training shards write full-shape stores holding zeros outside their
shard; `merge_similarity` sums them (exact: every number comes from one shard, the rest add 0).
In the candidate layout train_sqnorm is only computed for training examples that are some query's
candidate (0 for the others, which no score reads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tdabench.integrity import CorruptFileError, crc32, open_hdf5, read_checked, seal_hdf5
from tdabench.io import atomic_path
from tdabench.store import STR, StoreWriteError

log = logging.getLogger(__name__)
FORMAT = "tdabench-similarity/1"
REQUIRED = (
    "components",
    "component_params",
    "query_ids",
    "train_ids",
    "ground_truth",
    "query_sqnorm",
    "train_sqnorm",
    "dot",
)


@dataclass
class Similarity:
    components: list[str]
    component_params: np.ndarray  # [C]
    component_family: list[str]
    component_layer: np.ndarray  # [C]
    query_ids: list[str]
    train_ids: list[str]
    ground_truth: np.ndarray  # [Q]
    query_sqnorm: np.ndarray  # [C, Q]
    train_sqnorm: np.ndarray  # [C, T]
    dot: np.ndarray  # [C, Q, T], or [C, Q, b] with candidates
    attrs: dict
    candidates: np.ndarray | None = None  # [Q, b] indices into train_ids
    component_dim: np.ndarray | None = None  # [C] stored dims; None = component_params
    component_method: list[str] | None = None  # [C] exact | countsketch; None: from component_dim
    component_way: list[str] | None = None  # [C] cache | materialised | factored; None: unknown

    def __post_init__(self):
        if self.component_dim is None:
            self.component_dim = np.asarray(self.component_params)
        if self.component_method is None:
            self.component_method = [
                "exact" if d == p else "countsketch" for d, p in zip(self.component_dim, self.component_params)
            ]
        if self.component_way is None:
            self.component_way = ["unknown"] * len(self.components)

    def provenance(self) -> str:
        """One line, e.g. "210 exact components, dense layout, streamed from the model (materialised 210)"."""
        return describe_provenance(self.component_method, self.component_dim, self.component_way, self.attrs)

    @property
    def n_columns(self) -> int:
        """Training examples scored per query: all of them, or the candidates."""
        return self.dot.shape[2]

    def all_queries(self) -> np.ndarray:
        return np.arange(len(self.query_ids))

    def targets(self, queries: np.ndarray | None = None) -> np.ndarray:
        """Column of each query's source among the scored columns; -1 if not a candidate -> [Q']."""
        q = self.all_queries() if queries is None else np.asarray(queries)
        gt = self.ground_truth[q]
        if self.candidates is None:
            return gt
        hit = self.candidates[q] == gt[:, None]  # [Q', b]
        return np.where(hit.any(1), hit.argmax(1), -1)

    def train_sqnorm_columns(self, comps: np.ndarray, queries: np.ndarray | slice) -> np.ndarray:
        """Summed training squared norms per scored column: [T] dense, [Q', b] with candidates."""
        tn = self.train_sqnorm[comps].sum(axis=0, dtype=np.float64)  # [T]
        return tn if self.candidates is None else tn[self.candidates[queries]]

    def scores(
        self, components: Sequence[int] | np.ndarray | None = None, queries: np.ndarray | None = None
    ) -> np.ndarray:
        """Cosine [Q', T] (or [Q', b]) of the concatenated gradients of `components` (indices)."""
        comps = np.arange(len(self.components)) if components is None else np.asarray(components)
        q = slice(None) if queries is None else np.asarray(queries)
        dot = self.dot[comps][:, q].sum(axis=0, dtype=np.float64)  # [Q', N]
        qn = self.query_sqnorm[comps][:, q].sum(axis=0, dtype=np.float64)  # [Q']
        return cosine_from_sums(dot, qn, self.train_sqnorm_columns(comps, q))

    def component_index(self, names: Sequence[str]) -> np.ndarray:
        where = {n: i for i, n in enumerate(self.components)}
        return np.array([where[n] for n in names], dtype=np.int64)


def describe_provenance(methods: Sequence[str], dims: Sequence[int], ways: Sequence[str], attrs: dict) -> str:
    kinds: dict[str, int] = {}
    for m, d in zip(methods, dims):
        key = m if m == "exact" else f"{m} {int(d)}"
        kinds[key] = kinds.get(key, 0) + 1
    counted: dict[str, int] = {}
    for w in ways:
        counted[w] = counted.get(w, 0) + 1
    what = ", ".join(f"{n} {k}" for k, n in kinds.items())
    where = f"{what} components, {attrs.get('layout', 'dense')} layout"
    if attrs.get("source") != "stream":
        return f"{where}, from the gradient cache"
    return f"{where}, streamed from the model ({', '.join(f'{w} {n}' for w, n in counted.items())})"


def read_provenance(path: str | Path) -> str:
    """`Similarity.provenance` of a store, read from its metadata only (not its dot products)."""
    with open_hdf5(path) as f:
        n_c = f["components"].shape[0]
        params = f["component_params"][()]
        dims = f["component_dim"][()] if "component_dim" in f else params

        def strings(key, default):
            return [v.decode() if isinstance(v, bytes) else str(v) for v in f[key][()]] if key in f else default

        methods = strings("component_method", ["exact" if d == p else "countsketch" for d, p in zip(dims, params)])
        return describe_provenance(methods, dims, strings("component_way", ["unknown"] * n_c), dict(f.attrs))


def cosine_from_sums(dot: np.ndarray, q_sqnorm: np.ndarray, t_sqnorm: np.ndarray) -> np.ndarray:
    """dot [..., Q, N] / sqrt(q_sqnorm [..., Q] x t_sqnorm); 0 where a norm is 0.

    t_sqnorm is [..., N] (the same training examples for every query) or [..., Q, N] (per-query
    candidates).
    """
    t = t_sqnorm if t_sqnorm.ndim == dot.ndim else t_sqnorm[..., None, :]
    denom = np.sqrt(q_sqnorm[..., :, None] * t)
    return np.divide(dot, denom, out=np.zeros_like(dot, dtype=np.float64), where=denom > 0)


def load_similarity(path: str | Path) -> Similarity:
    """Read and validate a similarity store (ours or written by other code): shapes, finite
    values, non-negative norms, index ranges, unique ids and components."""
    with open_hdf5(path) as f:
        fmt = f.attrs.get("format")
        if fmt is not None and fmt != FORMAT:
            raise ValueError(f"{path}: format {fmt!r} is not {FORMAT!r}")
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise ValueError(
                f"{path}: not a similarity store: missing dataset(s) {', '.join(missing)} "
                f"(required: {', '.join(REQUIRED)}; see tdabench.similarity)"
            )

        def read(key):  # every dataset is read whole once, checked as it is read
            return read_checked(f, path, key)

        def strings(key):
            return [s.decode() if isinstance(s, bytes) else str(s) for s in read(key)]

        n_c = f["components"].shape[0]
        dot = read("dot")
        candidates = read("candidates") if "candidates" in f else None
        n_q, n_t = len(f["query_ids"]), len(f["train_ids"])
        expected = (n_c, n_q, n_t if candidates is None else candidates.shape[1])
        if dot.shape != expected:
            raise ValueError(
                f"{path}: dot has shape {dot.shape}, expected {expected} (components, queries, "
                f"{'training examples' if candidates is None else 'candidates'})"
            )
        sim = Similarity(
            components=strings("components"),
            component_params=read("component_params"),
            component_family=strings("component_family") if "component_family" in f else ["other"] * n_c,
            component_layer=read("component_layer") if "component_layer" in f else np.full(n_c, -1),
            query_ids=strings("query_ids"),
            train_ids=strings("train_ids"),
            ground_truth=read("ground_truth"),
            query_sqnorm=read("query_sqnorm"),
            train_sqnorm=read("train_sqnorm"),
            dot=dot,
            attrs=dict(f.attrs),
            candidates=candidates,
            component_dim=read("component_dim") if "component_dim" in f else None,
            component_method=strings("component_method") if "component_method" in f else None,
            component_way=strings("component_way") if "component_way" in f else None,
        )
    validate_similarity(sim, path)
    return sim


def validate_similarity(sim: Similarity, path: str | Path = "<similarity store>") -> None:
    """Refuse a store whose numbers cannot be right; the error names the file and the dataset."""
    n_c, n_q, n_t = len(sim.components), len(sim.query_ids), len(sim.train_ids)

    def bad(dataset: str, what: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: dataset {dataset} {what}")

    if n_c == 0 or n_q == 0 or n_t == 0:
        raise bad("components/query_ids/train_ids", f"is empty ({n_c} components, {n_q} queries, {n_t} train)")
    shapes = {
        "component_params": (sim.component_params, (n_c,)),
        "ground_truth": (sim.ground_truth, (n_q,)),
        "query_sqnorm": (sim.query_sqnorm, (n_c, n_q)),
        "train_sqnorm": (sim.train_sqnorm, (n_c, n_t)),
    }
    if sim.candidates is not None:
        shapes["candidates"] = (sim.candidates, (n_q, sim.candidates.shape[1] if sim.candidates.ndim == 2 else -1))
    for name, (array, shape) in shapes.items():
        if array.shape != shape:
            raise bad(name, f"has shape {array.shape}, expected {shape}")
    for name in ("components", "query_ids", "train_ids"):
        values = getattr(sim, name)
        if len(set(values)) != len(values):
            dup = sorted({v for v in values if values.count(v) > 1})
            raise bad(name, f"has duplicates, e.g. {dup[:3]}")
    for name in ("dot", "query_sqnorm", "train_sqnorm"):
        if not np.isfinite(getattr(sim, name)).all():
            raise bad(name, "holds NaN or inf values")
    for name in ("query_sqnorm", "train_sqnorm"):
        if (getattr(sim, name) < 0).any():
            raise bad(name, "holds negative squared norms")
    for name in ("component_method", "component_way"):
        if len(getattr(sim, name)) != n_c:
            raise bad(name, f"has {len(getattr(sim, name))} entries, expected {n_c} (components)")
    if (sim.component_params <= 0).any():
        raise bad("component_params", "holds non-positive parameter counts")
    if ((sim.ground_truth < 0) | (sim.ground_truth >= n_t)).any():
        raise bad("ground_truth", f"holds indices outside [0, {n_t}) (train_ids)")
    if sim.candidates is not None and ((sim.candidates < 0) | (sim.candidates >= n_t)).any():
        raise bad("candidates", f"holds indices outside [0, {n_t}) (train_ids)")


@dataclass
class Header:
    """Everything of a similarity store but its numbers: what a streamed job writes first."""

    components: list[str]
    component_params: list[int]
    component_family: list[str]
    component_layer: list[int]  # -1 for none
    component_dim: list[int]
    component_method: list[str]  # exact | countsketch
    component_way: list[str]  # materialised | factored | cache
    query_ids: list[str]
    train_ids: list[str]
    ground_truth: np.ndarray  # [Q]
    candidates: np.ndarray | None  # [Q, b] or None (dense layout)
    attrs: dict = field(default_factory=dict)  # setting, model_fingerprint, source, layout, ...

    @property
    def n_columns(self) -> int:
        return len(self.train_ids) if self.candidates is None else self.candidates.shape[1]

    def write(self, f: h5py.File) -> None:
        f.attrs["format"] = FORMAT
        for k, v in self.attrs.items():
            f.attrs[k] = v
        for name in ("components", "component_family", "component_method", "component_way", "query_ids", "train_ids"):
            f.create_dataset(name, data=np.array(getattr(self, name), dtype=object), dtype=STR)
        for name in ("component_params", "component_layer", "component_dim"):
            f.create_dataset(name, data=np.asarray(getattr(self, name), dtype=np.int64))
        f.create_dataset("ground_truth", data=np.asarray(self.ground_truth, dtype=np.int64))
        if self.candidates is not None:
            f.create_dataset("candidates", data=np.asarray(self.candidates, dtype=np.int64))

    def key(self) -> str:
        """What a partial file must have been started with to be resumed."""
        meta = {k: getattr(self, k) for k in ("components", "component_dim", "component_way", "query_ids", "train_ids")}
        meta["attrs"] = {k: str(v) for k, v in sorted(self.attrs.items())}
        meta["candidates"] = None if self.candidates is None else np.asarray(self.candidates).tolist()
        meta["ground_truth"] = np.asarray(self.ground_truth).tolist()
        return json.dumps(meta, sort_keys=True, default=int)


def _index(x) -> dict | list | None:
    """A slice or an index array as JSON (how a unit's region is recorded in the partial file)."""
    if x is None:
        return None
    if isinstance(x, slice):
        return {"start": None if x.start is None else int(x.start), "stop": None if x.stop is None else int(x.stop)}
    return np.asarray(x, dtype=np.int64).tolist()


def _unindex(x):
    return slice(x["start"], x["stop"]) if isinstance(x, dict) else np.asarray(x, dtype=np.int64)


class SimilarityWriter:
    """A similarity store written unit by unit into `.<name>.partial` (every dataset allocated,
    zero-filled); `done[u]` is set when unit u is in, with the regions it wrote
    (`unit_regions[u]`) and the CRC-32 of their bytes read back (`unit_crc[u]`). A rerun with the
    same header resumes: each done unit is read again and must match its checksum and be finite,
    else it is recomputed. On success the file is sealed and renamed into place; after an error it
    stays for the rerun."""

    def __init__(self, path: str | Path, header: Header, n_units: int, dtype: str = "float64", resume: bool = True):
        self.path, self.header, self.n_units, self.dtype, self.resume = Path(path), header, n_units, dtype, resume
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.file: h5py.File | None = None
        self.regions: list[dict] = []  # what the current unit has written so far

    @property
    def done(self) -> np.ndarray:
        return self.file["done"][()]

    def __enter__(self) -> SimilarityWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume and self.partial.exists():
            try:
                f = h5py.File(self.partial, "r+")
                if f.attrs.get("resume_key") == self.header.key() and f["done"].shape == (self.n_units,):
                    self.file = f
                    self._recheck_done_units()
                    log.info("resuming %s: %d of %d units done", self.partial, f["done"][()].sum(), self.n_units)
                    return self
                f.close()
                log.info("ignoring %s: written with other settings", self.partial)
            except (OSError, KeyError, ValueError) as e:
                log.info("ignoring unreadable %s (%s)", self.partial, e)
        self.partial.unlink(missing_ok=True)
        with self._io("creating the store"):
            self._create()
        return self

    def _create(self) -> None:
        h = self.header
        n_c, n_q = len(h.components), len(h.query_ids)
        self.file = f = h5py.File(self.partial, "w")
        h.write(f)
        f.attrs["resume_key"] = h.key()
        f.create_dataset("query_sqnorm", shape=(n_c, n_q), dtype=self.dtype, fillvalue=0)
        f.create_dataset("train_sqnorm", shape=(n_c, len(h.train_ids)), dtype=self.dtype, fillvalue=0)
        f.create_dataset("dot", shape=(n_c, n_q, h.n_columns), dtype=self.dtype, fillvalue=0)
        f.create_dataset("done", data=np.zeros(self.n_units, dtype=bool))
        f.create_dataset("unit_crc", data=np.zeros(self.n_units, dtype=np.uint32))
        f.create_dataset("unit_regions", shape=(self.n_units,), dtype=STR)
        f.flush()

    def _region_crc(self, regions: list[dict]) -> tuple[int, bool]:
        """CRC-32 of the regions' bytes as stored, and whether they are all finite."""
        crc, finite = 0, True
        for r in regions:
            key = (_unindex(r["components"]), *(_unindex(i) for i in r["index"]))
            block = self.file[r["dataset"]][key]
            crc = crc32(block, crc)
            finite = finite and bool(np.isfinite(block).all())
        return crc, finite

    def _recheck_done_units(self) -> None:
        """A done unit whose bytes changed since it was marked (or that holds a NaN) is redone."""
        f = self.file
        done = f["done"][()]
        for u in np.flatnonzero(done):
            text = f["unit_regions"][u]
            regions = json.loads(text.decode() if isinstance(text, bytes) else text)
            crc, finite = self._region_crc(regions)
            if crc != int(f["unit_crc"][u]) or not finite:
                why = "not finite" if crc == int(f["unit_crc"][u]) else "changed since it was written"
                log.warning("%s: unit %d %s; it is computed again", self.partial, u, why)
                done[u] = False
        f["done"][...] = done
        f.flush()

    def write(
        self,
        unit: int,
        queries: slice | np.ndarray,
        dot: np.ndarray,
        columns: slice | np.ndarray = slice(None),
        query_sqnorm: np.ndarray | None = None,
        train_rows: np.ndarray | slice | None = None,
        train_sqnorm: np.ndarray | None = None,
    ) -> None:
        """Unit `unit`: dot [C, queries, columns], optional query_sqnorm [C, queries] and
        train_sqnorm [C, train_rows] (queries and train_rows: slices or increasing rows), then
        mark it done."""
        self.put(queries, dot, columns, query_sqnorm, train_rows, train_sqnorm)
        self.mark(unit)

    def put(
        self,
        queries: slice | np.ndarray,
        dot: np.ndarray | None,
        columns: slice | np.ndarray = slice(None),
        query_sqnorm: np.ndarray | None = None,
        train_rows: np.ndarray | slice | None = None,
        train_sqnorm: np.ndarray | None = None,
        components: slice = slice(None),
    ) -> None:
        """Part of a unit, for `components` only (C of them): as `write`, nothing marked done."""
        f = self.file
        for name, value, index in (
            ("dot", dot, (queries, columns)),
            ("query_sqnorm", query_sqnorm, (queries,)),
            ("train_sqnorm", train_sqnorm, (train_rows,)),
        ):
            if value is not None:
                with self._io(f"writing {name}"):
                    f[name][(components, *index)] = value
                self.regions.append(
                    {"dataset": name, "components": _index(components), "index": [_index(i) for i in index]}
                )

    @contextlib.contextmanager
    def _io(self, what: str):
        """HDF5 write errors (a full disk surfaces as h5py's RuntimeError) named with the file."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            try:  # close now: h5py would otherwise fail again, noisily, when the handle is collected
                if self.file is not None:
                    self.file.close()
            except (OSError, RuntimeError):
                pass
            self.file = None
            raise StoreWriteError(
                f"{self.partial}: {what} failed ({' '.join(str(e).split())}); is the disk full? Free space "
                "and rerun: the units already done resume"
            ) from e

    def mark(self, unit: int) -> None:
        """Unit `unit` is wholly in the file: its regions and their checksum are recorded with it."""
        f = self.file
        with self._io(f"marking unit {unit} done"):
            f.flush()
            f["unit_crc"][unit], _ = self._region_crc(self.regions)
            f["unit_regions"][unit] = json.dumps(self.regions)
            f["done"][unit] = True
            f.flush()  # a unit is either wholly in the file and marked, or redone
        self.regions = []

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self.file = self.file, None
        if exc_type is not None:
            if f is not None:  # None: a write error closed it already
                f.close()
            if not self.resume:
                self.partial.unlink(missing_ok=True)  # nothing will resume from it
            return  # keep the partial file: a rerun resumes from its done mask
        missing = int((~f["done"][()]).sum())
        if missing:
            f.close()
            raise RuntimeError(f"{self.partial}: {missing} of {self.n_units} units were never written")
        for name in ("done", "unit_crc", "unit_regions"):
            del f[name]
        del f.attrs["resume_key"]
        f.close()
        seal_hdf5(self.partial)  # read back: finite, checksums stored, fsynced
        os.replace(self.partial, self.path)


def write_similarity(sim: Similarity, path: str | Path, dtype: str = "float64") -> None:
    """Write `sim` whole (atomically, sealed)."""
    header = Header(
        sim.components,
        [int(p) for p in sim.component_params],
        sim.component_family,
        [int(x) for x in sim.component_layer],
        [int(d) for d in sim.component_dim],
        sim.component_method,
        sim.component_way,
        sim.query_ids,
        sim.train_ids,
        sim.ground_truth,
        sim.candidates,
        {k: v for k, v in sim.attrs.items() if k != "format"},
    )
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            header.write(f)
            for name in ("query_sqnorm", "train_sqnorm", "dot"):
                f.create_dataset(name, data=getattr(sim, name).astype(dtype))
        seal_hdf5(tmp)


MERGE_ATTRS = ("setting", "model_fingerprint", "config_hash", "numerics", "layout", "source", "n_shards")


def merge_similarity(parts: Sequence[str | Path], out: str | Path, dtype: str = "float64") -> Similarity:
    """Sum similarity stores written over disjoint training shards (each holds zeros outside its
    shard, so the sum is exact) into `out`; refuses parts that differ in anything but numbers."""
    if not parts:
        raise ValueError("merge_similarity: no parts given")
    first = load_similarity(parts[0])
    same = ("components", "component_dim", "component_method", "query_ids", "train_ids")
    ways = [{w} for w in first.component_way]  # shards may choose differently: "factored+materialised"
    shards = {str(parts[0]): first.attrs.get("shard")}
    for p in parts[1:]:
        sim = load_similarity(p)
        for name in MERGE_ATTRS:
            if str(sim.attrs.get(name)) != str(first.attrs.get(name)):
                raise ValueError(
                    f"{p}: attribute {name} is {sim.attrs.get(name)!r}, but {parts[0]}'s is "
                    f"{first.attrs.get(name)!r}; parts of one store come from one model and one config: "
                    "rebuild them (snakemake --cores all --forcerun similarity_stream)"
                )
        shards[str(p)] = sim.attrs.get("shard")
        for seen, w in zip(ways, sim.component_way):
            seen.add(w)
        for name in same:
            if list(getattr(sim, name)) != list(getattr(first, name)):
                raise ValueError(f"{p}: {name} differs from {parts[0]}'s; parts of one store must share it")
        if not np.array_equal(sim.ground_truth, first.ground_truth) or (
            (sim.candidates is None) != (first.candidates is None)
            or (sim.candidates is not None and not np.array_equal(sim.candidates, first.candidates))
        ):
            raise ValueError(f"{p}: ground_truth or candidates differ from {parts[0]}'s")
        for name in ("dot", "query_sqnorm", "train_sqnorm"):
            setattr(first, name, getattr(first, name) + getattr(sim, name))
    n_shards = first.attrs.get("n_shards")
    if None not in shards.values() and (
        len(set(map(int, shards.values()))) != len(parts)
        or (n_shards is not None and sorted(map(int, shards.values())) != list(range(int(n_shards))))
    ):
        raise ValueError(
            f"merge_similarity: the parts' shards are {sorted(int(x) for x in shards.values())} ({', '.join(shards)}); "
            f"a store merges each of its {n_shards} training shards exactly once"
        )
    first.component_way = ["+".join(sorted(w)) for w in ways]
    first.attrs = {k: v for k, v in first.attrs.items() if k not in ("shard",)} | {"n_shards": len(parts)}
    write_similarity(first, out, dtype)
    return first
