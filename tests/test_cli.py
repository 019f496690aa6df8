"""The `tdabench` CLI on hand-made similarity files (as another codebase would write them), in the
dense and the candidate layout, against direct computation from the raw vectors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from tdabench.cli import main
from tdabench.similarity import load_similarity

from helpers import brute_force_ranks

N_C, N_Q, N_T, DIMS = 4, 8, 10, (3, 5, 2, 4)
CLI = str(Path(sys.executable).with_name("tdabench"))


def raw_case(seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, N_T, N_Q)
    tg = [rng.standard_normal((N_T, d)) for d in DIMS]
    qg = [rng.standard_normal((N_Q, d)) + 0.8 * t[gt] for t, d in zip(tg, DIMS)]
    return qg, tg, gt


def write_file(path, qg, tg, gt, candidates=None):
    """Only the documented datasets, written with plain h5py."""
    with h5py.File(path, "w") as f:
        f["components"] = np.array([f"block{c}.weight" for c in range(N_C)], dtype=object).astype("S")
        f["component_params"] = np.array([d * 10 for d in DIMS])  # e.g. sketched: params != dims
        f["component_dim"] = np.array(DIMS)  # optional dataset
        f["query_ids"] = np.array([f"q{i}" for i in range(N_Q)], dtype="S")
        f["train_ids"] = np.array([f"t{i}" for i in range(N_T)], dtype="S")
        f["ground_truth"] = gt
        f["query_sqnorm"] = np.stack([(q * q).sum(1) for q in qg])
        f["train_sqnorm"] = np.stack([(t * t).sum(1) for t in tg])
        dense = np.stack([q @ t.T for q, t in zip(qg, tg)])
        if candidates is None:
            f["dot"] = dense
        else:
            f["candidates"] = candidates
            f["dot"] = np.take_along_axis(dense, candidates[None], axis=2)


def candidates_for(gt, seed=1, b=4):
    rng = np.random.default_rng(seed)
    rows = []
    for q, g in enumerate(gt):
        others = [t for t in rng.permutation(N_T) if t != g]
        rows.append(others[:b] if q % 3 == 2 else others[: b - 1] + [g])  # every third query: source missing
    return np.array(rows)


def direct_ranks(qg, tg, gt, comps, queries, candidates=None):
    return brute_force_ranks(qg, tg, gt, comps, queries, candidates)


@pytest.fixture(params=["dense", "candidates"])
def case(request, tmp_path):
    qg, tg, gt = raw_case()
    cands = candidates_for(gt) if request.param == "candidates" else None
    path = tmp_path / f"{request.param}.h5"
    write_file(path, qg, tg, gt, cands)
    return path, qg, tg, gt, cands


def test_evaluate_matches_direct_computation(case, tmp_path, capsys):
    path, qg, tg, gt, cands = case
    main(
        [
            "evaluate",
            "--similarity",
            str(path),
            "--components",
            "block0.*",
            "block2.*",
            "--queries",
            "q1,q3,q4,q6,q7",
            "--k",
            "1",
            "3",
        ]
    )
    got = json.loads(capsys.readouterr().out)
    ranks = direct_ranks(qg, tg, gt, [0, 2], [1, 3, 4, 6, 7], cands)
    assert got["n_queries"] == 5 and got["components"] == ["block0.weight", "block2.weight"]
    assert got["dim"] == DIMS[0] + DIMS[2] and got["params"] == 10 * (DIMS[0] + DIMS[2])
    assert np.isclose(got["top1"], np.mean(ranks == 1))
    assert np.isclose(got["mrr"], np.mean(1 / ranks))
    assert np.isclose(got["recall_at_k"]["3"], np.mean(ranks <= 3))


def test_components_table_matches_direct_computation(case, tmp_path):
    path, qg, tg, gt, cands = case
    out = tmp_path / "components.parquet"
    main(["components", "--similarity", str(path), "--out", str(out)])
    table = pl.read_parquet(out)
    assert table.columns[:8] == ["component", "family", "layer", "params", "dim", "method", "way", "top1"]
    assert {"mrr", "rho"} <= set(table.columns)
    sim = load_similarity(path)  # how each component was computed comes from the store
    assert table["method"].to_list() == list(sim.component_method)
    assert table["way"].to_list() == list(sim.component_way)
    full = [direct_scores_flat(qg, tg, list(range(N_C)), cands)]
    for c, row in enumerate(table.iter_rows(named=True)):
        ranks = direct_ranks(qg, tg, gt, [c], range(N_Q), cands)
        assert np.isclose(row["top1"], np.mean(ranks == 1)) and np.isclose(row["mrr"], np.mean(1 / ranks))
        mine = direct_scores_flat(qg, tg, [c], cands)
        assert np.isclose(row["rho"], mine @ full[0] / (np.linalg.norm(mine) * np.linalg.norm(full[0])))


def direct_scores_flat(qg, tg, comps, cands):
    out = []
    for q in range(N_Q):
        qv = np.concatenate([qg[c][q] for c in comps])
        for t in range(N_T) if cands is None else cands[q]:
            tv = np.concatenate([tg[c][t] for c in comps])
            out.append(qv @ tv / (np.linalg.norm(qv) * np.linalg.norm(tv)))
    return np.array(out)


def test_greedy_table_scores_each_step_on_held_out_queries(case, tmp_path):
    path, qg, tg, gt, cands = case
    out = tmp_path / "greedy.parquet"
    main(
        [
            "greedy",
            "--similarity",
            str(path),
            "--objective",
            "mrr",
            "--selection-fraction",
            "0.5",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    table = pl.read_parquet(out)
    assert table["step"].to_list() == [1, 2, 3, 4]
    assert {"component", "params_cum", "param_share", "objective", "top1", "mrr"} <= set(table.columns)
    assert table["param_share"][-1] == 1.0 and (table["scored_on"] == "held-out").all()
    from tdabench.selection import split_queries

    _, held = split_queries([f"q{i}" for i in range(N_Q)], 0.5, 3)
    order = [int(c[5]) for c in table["component"]]
    for step, row in enumerate(table.iter_rows(named=True), start=1):
        ranks = direct_ranks(qg, tg, gt, order[:step], held, cands)
        assert np.isclose(row["top1"], np.mean(ranks == 1)) and np.isclose(row["mrr"], np.mean(1 / ranks))


def test_greedy_without_split_says_in_sample(tmp_path, capsys):
    qg, tg, gt = raw_case()
    write_file(tmp_path / "s.h5", qg, tg, gt)
    main(["greedy", "--similarity", str(tmp_path / "s.h5"), "--objective", "top1", "--out", str(tmp_path / "g.csv")])
    assert "in-sample" in capsys.readouterr().err
    assert set(pl.read_csv(tmp_path / "g.csv")["scored_on"]) == {"in-sample"}


@pytest.mark.slow  # fresh processes, one per PYTHONHASHSEED
def test_greedy_is_identical_across_runs_and_hash_seeds(tmp_path):
    qg, tg, gt = raw_case(4)
    write_file(tmp_path / "s.h5", qg, tg, gt)
    tables = []
    for hash_seed in ("0", "1", "12345"):
        out = tmp_path / f"g{hash_seed}.csv"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run(
            [
                CLI,
                "greedy",
                "--similarity",
                str(tmp_path / "s.h5"),
                "--objective",
                "top1",
                "--selection-fraction",
                "0.5",
                "--out",
                str(out),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        tables.append(out.read_text())
    assert tables[0] == tables[1] == tables[2]


def test_bad_arguments_are_clear(tmp_path):
    qg, tg, gt = raw_case()
    write_file(tmp_path / "s.h5", qg, tg, gt)
    for args, message in (
        (["--components", "nothing*"], "matches no component"),
        (["--queries", "q1,zz"], "unknown query ids"),
        (["--queries", "1.5"], "fraction"),
    ):
        r = subprocess.run(
            [CLI, "evaluate", "--similarity", str(tmp_path / "s.h5"), *args], capture_output=True, text=True
        )
        assert r.returncode != 0 and message in r.stderr
    pl.DataFrame({"x": [1]}).write_parquet(tmp_path / "t.parquet")
    for args, message in (
        (["evaluate", "--similarity", str(tmp_path / "t.parquet")], "t.parquet is not a similarity store (an HDF5"),
        (["greedy", "--similarity", str(tmp_path / "s.h5"), "--seed", "-1", "--out", "g"], "--seed: must be at"),
        (["compare", str(tmp_path / "nothere"), str(tmp_path)], "nothere is not a folder"),
    ):
        r = subprocess.run([CLI, *args], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr
        assert "rebuild" not in r.stderr


def _results_folder(root, weight=0.0, top1=0.5, seconds=0.1):
    """A results folder with one output of several stages: data, a fine-tuned model, a similarity
    store and the metrics table."""
    import h5py
    import numpy as np
    from safetensors.numpy import save_file

    (root / "data").mkdir(parents=True)
    pl.DataFrame({"id": ["t0", "t1"], "prompt": ["a", "b"]}).write_parquet(root / "data" / "train.parquet")
    (root / "models" / "finetuned").mkdir(parents=True)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    w[1, 2] += weight
    save_file({"w": w, "b": np.ones(3, dtype=np.float32)}, str(root / "models" / "finetuned" / "model.safetensors"))
    (root / "similarity").mkdir()
    with h5py.File(root / "similarity" / "paraphrased.h5", "w") as f:
        f["dot"] = np.linspace(0, 1, 12).reshape(3, 4) + weight
        f["k8/seconds"] = np.full(3, seconds)  # a dataset of wall times (projection parts): ignored
        f.attrs["checksums"] = "ignored"
    (root / "evaluation").mkdir()
    pl.DataFrame(
        {"method": ["full", "greedy"], "top1": [0.25, top1], "seconds_per_sample": [seconds, 0.2]}
    ).write_parquet(root / "evaluation" / "metrics.parquet")


def test_compare_names_the_first_stage_whose_outputs_differ_and_by_how_much(tmp_path, capsys):
    from tdabench.compare import compare_stages, first_difference

    _results_folder(tmp_path / "a")
    _results_folder(tmp_path / "b", seconds=0.3)  # timings never match: ignored
    reports = compare_stages(tmp_path / "a", tmp_path / "b")
    assert [r.stage for r in reports] == ["data", "fine-tuned model", "similarity", "metrics"]
    assert first_difference(reports) is None
    main(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "same numbers" in capsys.readouterr().out

    _results_folder(tmp_path / "c", weight=2**-10, top1=0.51)  # one weight moved, and all that follows
    first = first_difference(compare_stages(tmp_path / "a", tmp_path / "c"))
    assert first.stage == "fine-tuned model"
    (model,) = first.differences
    assert (model.n_diff, model.n_total, model.max_abs) == (1, 9, 2**-10) and "w" in model.note
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "a"), str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "similarity: DIFFERS" in out and "12 of 12 values differ" in out
    assert "metrics: DIFFERS" in out and "column top1: 1 of 2 values differ" in out
    assert out.strip().splitlines()[-1].startswith("first difference: fine-tuned model (models/finetuned/")


def test_agree_measures_two_stores_against_direct_cosines(tmp_path, capsys):
    """A store and a noisy copy of it (a stand-in for sketched vs exact): the reported cosine
    differences and metrics are those of direct computation; a store agrees with itself exactly."""
    qg, tg, gt = raw_case()
    rng = np.random.default_rng(5)
    noisy_q = [q + 0.3 * rng.standard_normal(q.shape) for q in qg]
    write_file(tmp_path / "a.h5", qg, tg, gt)
    write_file(tmp_path / "b.h5", noisy_q, tg, gt)
    main(["agree", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "--steps", "3"])
    got = json.loads(capsys.readouterr().out)

    def cos(qs, c):  # [Q, T] cosine of component c
        q, t = qs[c], tg[c]
        return (q @ t.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(t, axis=1)[None]

    per = max(np.abs(cos(qg, c) - cos(noisy_q, c)).max() for c in range(N_C))
    assert got["max_abs_cosine_diff"]["per_component"] == pytest.approx(per, rel=1e-9)
    for side, qs in (("a", qg), ("b", noisy_q)):
        ranks = direct_ranks(qs, tg, gt, list(range(N_C)), np.arange(N_Q))
        assert got["full"][side]["top1"] == pytest.approx(np.mean(ranks == 1))
    assert got["n_components"] == N_C and len(got["greedy"]["a"]) == 3

    main(["agree", str(tmp_path / "a.h5"), str(tmp_path / "a.h5")])
    same = json.loads(capsys.readouterr().out)
    assert same["max_abs_cosine_diff"] == {"full": 0.0, "per_component": 0.0}
    assert same["greedy"]["same_first"] == N_C and same["per_component_top1"]["mean_abs_diff"] == 0

    write_file(tmp_path / "c.h5", qg, tg, gt, candidates_for(gt))
    r = subprocess.run([CLI, "agree", str(tmp_path / "a.h5"), str(tmp_path / "c.h5")], capture_output=True, text=True)
    assert r.returncode == 2 and "score different columns" in r.stderr
