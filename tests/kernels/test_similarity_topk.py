"""similarity_topk against the float64 reference: values, indices (exact where scores are separated, and
within tolerance where they nearly tie), exact tie-breaking to the lower index, chunked streaming, on the
Triton interpreter and the torch fallback (GPU: compiled Triton, marked `gpu`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wave_rt.kernels import _dispatch as dispatch
from wave_rt.kernels import similarity_topk
from wave_rt.kernels._checks import KernelArgumentError
from wave_rt.kernels.reference import similarity_topk_reference

pytestmark = pytest.mark.usefixtures("poison", "seed")

CPU_DTYPES = (torch.float32, torch.float16)


def scores64(queries: torch.Tensor, corpus: torch.Tensor, normalize: bool) -> torch.Tensor:
    q, c = queries.double(), corpus.double()
    if normalize:
        q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    return q @ c.T


def check_topk(values: torch.Tensor, indices: torch.Tensor, queries64: torch.Tensor, corpus64: torch.Tensor,
               k: int, normalize: bool, dtype: torch.dtype, accuracy) -> None:
    """Values within the accuracy rule of the float64 top-k; every returned index's float64 score equal to the
    reference score at its rank within that same tolerance (so near-ties may swap, nothing else may); indices
    equal to the reference wherever the reference score is separated from its neighbours by more than twice
    the tolerance; descending order with equal values ordered by index."""
    n_q, n = queries64.shape[0], corpus64.shape[0]
    assert values.shape == (n_q, k) and indices.shape == (n_q, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    values, indices = values.cpu(), indices.cpu()
    s64 = scores64(queries64, corpus64, normalize).cpu()
    ref_values, ref_indices = torch.sort(s64, dim=1, descending=True, stable=True)
    base_values, _ = similarity_topk_reference(queries64.to(dtype), corpus64.to(dtype), k, normalize)
    accuracy("values", values, ref_values[:, :k], base_values, dtype)

    tol = accuracy.allowed(ref_values[:, :k], base_values, dtype)
    assert ((indices >= 0) & (indices < n)).all(), "index out of range"
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "an index is returned twice"
    chosen = s64.gather(1, indices)
    worst = (chosen - ref_values[:, :k]).abs().max().item()
    assert worst <= tol, f"a returned index scores {worst:.3e} away from the reference at its rank (tol {tol:.3e})"

    padded = torch.cat([torch.full((n_q, 1), float("inf"), dtype=torch.float64), ref_values,
                        torch.full((n_q, 1), float("-inf"), dtype=torch.float64)], dim=1)
    gap = torch.minimum(padded[:, :-2] - padded[:, 1:-1], padded[:, 1:-1] - padded[:, 2:])[:, :k]
    separated = gap > 2 * tol
    assert torch.equal(indices[separated], ref_indices[:, :k][separated])

    assert (values.diff(dim=1) <= 0).all(), "values are not sorted in descending order"
    same = values[:, 1:] == values[:, :-1]
    assert (indices[:, 1:][same] > indices[:, :-1][same]).all(), "equal values not ordered by index"


# --------------------------------------------------------------------------------------- random data
CASES = {
    # name: (queries, corpus rows, D, k, normalize, chunk_size). q <= 16 takes the one-pass streaming tile
    # with in-loop corpus norms; more queries take the multi-tile path with precomputed norms.
    "k40": (7, 300, 123, 40, True, None),
    "k100-raw": (5, 150, 123, 100, False, None),
    "k1-chunked": (9, 257, 64, 1, True, 100),
    "k=N": (3, 37, 123, 37, True, None),
    "2qblocks-chunked": (17, 200, 33, 20, False, 64),
    "q1-k1024": (1, 1031, 19, 1024, True, None),
    "q1-k3-chunked": (1, 517, 37, 3, False, 200),
    "q7-k1024-chunked": (7, 1100, 13, 1024, False, 600),
    "q300-k33": (300, 211, 29, 33, True, None),
    "q300-k130-chunked": (300, 263, 17, 130, False, 100),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_similarity_topk_matches_float64(cpu_backend, accuracy, dtype, case):
    n_q, n, dim, k, normalize, chunk_size = CASES[case]
    queries64 = torch.randn(n_q, dim, dtype=torch.float64)
    corpus64 = torch.randn(n, dim, dtype=torch.float64) * (1.0 if normalize else 0.3)
    with dispatch.force_backend(cpu_backend):
        values, indices = similarity_topk(queries64.to(dtype), corpus64.to(dtype), k, normalize=normalize,
                                          chunk_size=chunk_size)
    check_topk(values, indices, queries64, corpus64, k, normalize, dtype, accuracy)


def test_similarity_topk_chunk_sizes(cpu_backend, accuracy):
    """Several launches (or torch chunks) with running-list merges: correct for every chunk size, including
    chunks smaller than a tile and than k, and a last chunk of one row."""
    queries64 = torch.randn(4, 40, dtype=torch.float64)
    corpus64 = torch.randn(161, 40, dtype=torch.float64)
    for chunk_size in (160, 53, 17):
        with dispatch.force_backend(cpu_backend):
            values, indices = similarity_topk(queries64.float(), corpus64.float(), 24, chunk_size=chunk_size)
        check_topk(values, indices, queries64, corpus64, 24, True, torch.float32, accuracy)


def test_similarity_topk_many_tiles_per_program(monkeypatch, accuracy):
    """Few corpus ranges per launch (as on a GPU with a large corpus): each program folds 16 tiles into its
    running list (16 keys: K_PAD), and later tiles mostly hold no key above the running 16th best."""
    monkeypatch.setattr(dispatch, "num_sms", lambda device: 1)  # 4 ranges of 512 rows, 32-row tiles
    queries64 = torch.randn(2, 20, dtype=torch.float64)
    corpus64 = torch.randn(2048, 20, dtype=torch.float64)
    with dispatch.force_backend("interpret"):
        values, indices = similarity_topk(queries64.float(), corpus64.float(), 5)
    check_topk(values, indices, queries64, corpus64, 5, True, torch.float32, accuracy)


def test_similarity_topk_single_late_improvement(monkeypatch):
    """Scores that fall with the index, except one planted best row late in a program's range: that tile
    holds exactly one key above the running list, and the fold must not skip it."""
    monkeypatch.setattr(dispatch, "num_sms", lambda device: 1)  # 4 ranges of 512 rows, 32-row tiles
    n, dim = 2048, 8
    corpus = torch.randn(n, dim)
    corpus[:, 0] = -torch.arange(n, dtype=torch.float32) / n  # score of row i: -i/n (exact in fp32)
    planted = int(torch.randint(0, 4, ()).item()) * 512 + int(torch.randint(32, 512, ()).item())
    corpus[planted, 0] = 1.0
    query = torch.zeros(1, dim)
    query[0, 0] = 1.0
    expected = torch.tensor([[planted, *[i for i in range(4) if i != planted][:3]]])
    for backend in ("interpret", "torch"):
        with dispatch.force_backend(backend):
            values, indices = similarity_topk(query, corpus, 4, normalize=False)
        assert torch.equal(indices, expected), (backend, planted, indices)
        assert torch.equal(values, corpus[expected[0], 0][None]), backend


def test_similarity_topk_strided_inputs(cpu_backend, accuracy):
    """queries as a transposed view, corpus rows with a non-unit element stride: read through strides."""
    dim = 45
    queries64 = torch.randn(dim, 6, dtype=torch.float64).T
    corpus_buf = torch.randn(130, 2 * dim, dtype=torch.float64)
    corpus64 = corpus_buf[:, 1::2]
    queries, corpus = queries64.T.float().T, corpus_buf.float()[:, 1::2]
    assert queries.stride() == queries64.stride() and corpus.stride() == corpus64.stride()
    with dispatch.force_backend(cpu_backend):
        values, indices = similarity_topk(queries, corpus, 33, chunk_size=70)
    check_topk(values, indices, queries64, corpus64, 33, True, torch.float32, accuracy)


def test_similarity_topk_k1024(cpu_backend, accuracy):
    """The largest k: one 1024-wide tile per program, running lists of 1024 keys, merged across splits."""
    queries64 = torch.randn(3, 16, dtype=torch.float64)
    corpus64 = torch.randn(1300, 16, dtype=torch.float64)
    with dispatch.force_backend(cpu_backend):
        values, indices = similarity_topk(queries64.float(), corpus64.float(), 1024)
    check_topk(values, indices, queries64, corpus64, 1024, True, torch.float32, accuracy)


# ------------------------------------------------------------------------------------- both regimes
@pytest.mark.parametrize("n_q", [1, 7, 300])
def test_similarity_topk_late_improvements_every_row(monkeypatch, n_q):
    """Scores that rise with the index, so every tile beats the running threshold of every row and the
    candidate buffers fill and fold over and over; plus, per query, one planted best row at a random late
    position. Exact data (powers of two): the expected order is known exactly."""
    monkeypatch.setattr(dispatch, "num_sms", lambda device: 1)  # few ranges per launch: long scans
    n, dim, k = 700, 4, 40
    corpus = torch.zeros(n, dim)
    corpus[:, 0] = torch.arange(n, dtype=torch.float32) / 1024  # score of row i for query e0: i / 1024
    corpus[:, 1] = 1.0
    queries = torch.zeros(n_q, dim)
    queries[:, 0] = 1.0
    planted = torch.randint(n // 2, n, (1,)).item()
    corpus[planted, 0] = 0.0
    corpus[planted, 2] = 4.0  # only queries with a 1 in column 2 see it as their best
    queries[::2, 2] = 1.0
    scores = queries.double() @ corpus.double().T
    expected = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    with dispatch.force_backend("interpret"):
        values, indices = similarity_topk(queries, corpus, k, normalize=False, chunk_size=512)
    assert torch.equal(indices, expected)
    assert torch.equal(values.double(), scores.gather(1, expected))


# --------------------------------------------------------------------------------------------- ties
def tied_corpus(n: int, dim: int, distinct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer rows that are signed permutations of one vector: every dot product is an exact integer
    and every row has the same exact norm, so scores tie exactly (normalized or not, in fp16 too) and the
    expected order is known exactly: integer score descending, then index ascending. Returns (base rows
    [distinct, dim], corpus [n, dim]) with each corpus row a copy of a random base row."""
    v = torch.randint(1, 4, (dim,)).double()
    base = torch.stack([v[torch.randperm(dim)] * (torch.randint(0, 2, (dim,)) * 2 - 1) for _ in range(distinct)])
    return base, base[torch.randint(0, distinct, (n,))]


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_similarity_topk_ties_go_to_lower_index(cpu_backend, dtype, normalize):
    n, dim, k = 230, 24, 40
    _, corpus64 = tied_corpus(n, dim, distinct=5)
    queries64 = torch.randint(-3, 4, (6, dim)).double()
    int_scores = (queries64 @ corpus64.T).long()
    # Expected: a stable sort on the exact integer scores, i.e. runs of equal scores in index order.
    expected = torch.sort(-int_scores, dim=1, stable=True).indices[:, :k]
    want_values = scores64(queries64, corpus64, normalize).gather(1, expected)
    results = []
    for chunk_size in (None, 64, 25):  # ties straddle chunk, split and tile boundaries
        with dispatch.force_backend(cpu_backend):
            values, indices = similarity_topk(queries64.to(dtype), corpus64.to(dtype), k, normalize=normalize,
                                              chunk_size=chunk_size)
        assert torch.equal(indices, expected), f"chunk_size={chunk_size}"
        torch.testing.assert_close(values.double(), want_values, rtol=1e-6, atol=1e-6)
        results.append(values)
    # Exact data: the values themselves do not depend on how the corpus was chunked.
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("n_q", [1, 300])
def test_similarity_topk_ties_both_regimes(n_q):
    """Planted ties on the one-query streaming tile and the many-query tiles (interpreter, fp16)."""
    _, corpus64 = tied_corpus(150, 16, distinct=4)
    queries64 = torch.randint(-3, 4, (n_q, 16)).double()
    expected = torch.sort(-(queries64 @ corpus64.T).long(), dim=1, stable=True).indices[:, :70]
    with dispatch.force_backend("interpret"):
        _, indices = similarity_topk(queries64.half(), corpus64.half(), 70, chunk_size=100)
    assert torch.equal(indices, expected)


def test_similarity_topk_signed_zero_scores_tie(cpu_backend):
    """-0.0 and +0.0 are the same score: the lower index wins, whatever the sign bit."""
    queries = torch.tensor([[1.0], [-1.0]])
    corpus = torch.tensor([[-0.0], [0.0], [0.0], [-0.0], [-1.0]])
    with dispatch.force_backend(cpu_backend):
        values, indices = similarity_topk(queries, corpus, 4, normalize=False)
    assert torch.equal(indices, torch.tensor([[0, 1, 2, 3], [4, 0, 1, 2]]))
    assert torch.equal(values, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_similarity_topk_zero_vectors(cpu_backend):
    """Zero rows normalize to zero (x / max(||x||, 1e-12)): scores 0, no NaN, ties in index order."""
    queries = torch.randn(3, 8)
    queries[1] = 0.0
    corpus = torch.randn(20, 8)
    corpus[[3, 7]] = 0.0
    with dispatch.force_backend(cpu_backend):
        values, indices = similarity_topk(queries, corpus, 20)
    assert not torch.isnan(values).any()
    assert torch.equal(indices[1], torch.arange(20)) and not values[1].any()
    ref_values, ref_indices = similarity_topk_reference(queries.double(), corpus.double(), 20)
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("nan", [float("nan"), -float("nan")], ids=["+nan", "-nan"])
def test_similarity_topk_nan_rows_and_minus_inf_scores_rank_last(cpu_backend, normalize, nan):
    """A row holding NaN scores NaN (either sign bit): it counts as -inf, ranks last and reads -inf, on every
    path. Rows scoring -inf are still returned when k asks for them (the kernel used to leave such slots
    unfilled: index 2^32 - 1, value NaN)."""
    torch.manual_seed(0)
    queries = torch.randn(2, 5)
    corpus = torch.randn(4, 5)
    corpus[1, 2] = nan
    with dispatch.force_backend(cpu_backend):
        values, indices = similarity_topk(queries, corpus, 4, normalize=normalize)
    assert indices[:, -1].tolist() == [1, 1] and torch.isneginf(values[:, -1]).all()
    assert sorted(indices[0].tolist()) == [0, 1, 2, 3] and not torch.isnan(values).any()
    if not normalize:
        corpus[1] = torch.tensor([float("inf"), 0, 0, 0, 0])
        q = torch.tensor([[-1.0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 0]])
        with dispatch.force_backend(cpu_backend):
            values, indices = similarity_topk(q, corpus, 4, normalize=False)
        assert indices[:, -1].tolist() == [1, 1] and torch.isneginf(values[:, -1]).all()
        assert ((indices >= 0) & (indices < 4)).all()


def test_similarity_topk_no_queries(cpu_backend):
    with dispatch.force_backend(cpu_backend):
        values, indices = similarity_topk(torch.empty(0, 8), torch.randn(10, 8), 3)
    assert values.shape == (0, 3) and values.dtype == torch.float32
    assert indices.shape == (0, 3) and indices.dtype == torch.int64


def test_similarity_topk_argument_errors():
    q, c = torch.randn(2, 8), torch.randn(10, 8)
    cases = [
        ((q, c.half(), 3), {}, "corpus", "dtype"),
        ((q, c[:, :7], 3), {}, "corpus", "D = 7"),
        ((q[0], c, 3), {}, "queries", "2 dimensions"),
        ((q.long(), c.long(), 3), {}, "queries", "dtype"),
        ((q, c, 0), {}, "k", "[1, min(N, 1024)]"),
        ((q, c, 11), {}, "k", "N = 10"),
        ((q, torch.randn(2000, 8), 1025), {}, "k", "1024"),
        ((q, c, True), {}, "k", "int"),
        ((q, c, 2.0), {}, "k", "int"),
        ((q, c, 3), {"chunk_size": 0}, "chunk_size", "positive"),
        ((q, c, 3), {"chunk_size": True}, "chunk_size", "positive"),
        ((q, torch.empty(0, 8), 1), {}, "k", "N = 0"),
    ]
    for args, kwargs, argument, text in cases:
        with pytest.raises(KernelArgumentError) as info:
            similarity_topk(*args, **kwargs)
        assert info.value.op == "similarity_topk" and info.value.argument == argument, info.value
        assert text in str(info.value)


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "k"), [
    # Every (dtype, k) pair autotunes and compiles its own bitonic networks (minutes for k = 1024): a
    # diagonal of the grid rather than all of it.
    (torch.bfloat16, 1), (torch.float16, 100), (torch.bfloat16, 100), (torch.float32, 100), (torch.bfloat16, 1024),
], ids=["bf16-k1", "fp16-k100", "bf16-k100", "fp32-k100", "bf16-k1024"])
def test_similarity_topk_gpu(cuda, accuracy, dtype, k):
    queries64 = torch.randn(70, 256, dtype=torch.float64, device=cuda)
    corpus64 = torch.randn(50_003, 256, dtype=torch.float64, device=cuda)
    assert dispatch.select_backend(queries64) == "triton"
    for normalize, chunk_size in ((True, None), (False, 20_000)):
        values, indices = similarity_topk(queries64.to(dtype), corpus64.to(dtype), k, normalize=normalize,
                                          chunk_size=chunk_size)
        check_topk(values, indices, queries64, corpus64, k, normalize, dtype, accuracy)


@pytest.mark.gpu
@pytest.mark.parametrize("n_q", [1, 16, 300])
def test_similarity_topk_gpu_regimes(cuda, accuracy, n_q):
    """The one-tile streaming pass (q <= 16) and the 128-row tensor-core tiles (q = 300), fp16, k = 100."""
    queries64 = torch.randn(n_q, 200, dtype=torch.float64, device=cuda)
    corpus64 = torch.randn(30_011, 200, dtype=torch.float64, device=cuda)
    for normalize in (True, False):
        values, indices = similarity_topk(queries64.half(), corpus64.half(), 100, normalize=normalize)
        check_topk(values, indices, queries64, corpus64, 100, normalize, torch.float16, accuracy)


@pytest.mark.gpu
def test_similarity_topk_gpu_corpus_in_host_memory(cuda, accuracy):
    """A pinned CPU corpus streamed to the GPU chunk by chunk gives the same result as a resident one."""
    queries64 = torch.randn(33, 128, dtype=torch.float64)
    corpus64 = torch.randn(40_000, 128, dtype=torch.float64)
    queries, corpus_host = queries64.half().to(cuda), corpus64.half().pin_memory()
    values, indices = similarity_topk(queries, corpus_host, 64, chunk_size=9_000)
    assert values.device.type == "cuda"
    check_topk(values, indices, queries64, corpus64, 64, True, torch.float16, accuracy)
    resident = similarity_topk(queries, corpus_host.to(cuda), 64, chunk_size=9_000)
    assert torch.equal(resident[1], indices) and torch.equal(resident[0], values)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [True, False])
def test_similarity_topk_gpu_ties(cuda, normalize):
    _, corpus64 = tied_corpus(30_000, 64, distinct=7)
    queries64 = torch.randint(-3, 4, (40, 64)).double()
    expected = torch.sort(-(queries64 @ corpus64.T).long(), dim=1, stable=True).indices[:, :300]
    for chunk_size in (None, 7_000):
        _, indices = similarity_topk(queries64.half().to(cuda), corpus64.half().to(cuda), 300, normalize=normalize,
                                     chunk_size=chunk_size)
        assert torch.equal(indices.cpu(), expected)


@pytest.mark.gpu
def test_similarity_topk_gpu_memory_is_not_q_by_n(cuda):
    """The [q, N] score matrix is never built: peak extra memory stays within the documented bound, one
    launch's workspace (_WORKSPACE_BYTES) + the corpus norms (4 bytes a row) + O(q * k) lists, a few
    percent of the scores."""
    from wave_rt.kernels.similarity import _WORKSPACE_BYTES

    n_q, n = 256, 2_000_000
    queries = torch.randn(n_q, 64, device=cuda, dtype=torch.float16)
    corpus = torch.randn(n, 64, device=cuda, dtype=torch.float16)
    similarity_topk(queries, corpus, 16)  # autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    similarity_topk(queries, corpus, 16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= _WORKSPACE_BYTES + 4 * n + (1 << 20), f"{extra / 2**20:.1f} MiB extra for a {n_q}x{n} problem"
    assert extra < 0.05 * n_q * n * 4
