"""The benchmark commands run, interleave their contenders, and check peers against the loop
(their numbers are printed, never asserted)."""

import re

import numpy as np
import pytest

from tdabench.dev.bench.__main__ import main
from tdabench.dev.bench.kit import Contender, interleave, spread


@pytest.mark.slow  # a gc.collect() before every timed call, as timeit
def test_interleave_rotates_the_order_and_times_every_round():
    order = []
    contenders = [Contender(n, lambda r, n=n: order.append((r, n)), lambda r: 1) for n in "abc"]
    seconds = interleave(contenders, rounds=4, warmup=1)
    assert order[:3] == [(0, "a"), (0, "b"), (0, "c")]  # warm-up, not timed
    assert [n for _, n in order[3:]] == list("abcbcacababc")
    assert {k: len(v) for k, v in seconds.items()} == {"a": 4, "b": 4, "c": 4}
    assert spread(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == (3.0, 2.0, 4.0)


@pytest.mark.slow
def test_the_gradients_benchmark_runs_every_contender_and_its_peers_agree_with_the_loop(capsys):
    from tdabench.dev.bench.__main__ import main

    main(["gradients", "--samples", "6", "--length", "12", "--batch-size", "3", "--rounds", "2", "--peers"])
    out = capsys.readouterr().out
    for name in (
        "a_all",
        "b_last_mlp",
        "b_greedy",
        "b_linear",
        "c_reference_loop",
        "d_plain_fwd_bwd",
        "peer_torch_func",
    ):
        assert f"\n{name} " in out, out
    for line in out.splitlines():  # ours and every peer: coverage and error against the bs=1 loop
        if line.startswith(("a_all", "b_linear", "peer_")):
            covered, total = line.split()[-2].split("/")
            assert float(line.split()[-1]) < 1e-4 and int(covered) >= 1 and int(total) == 39, line
    assert "# (a)/(d) = " in out


@pytest.mark.slow  # benchmark runs
def test_projection_and_greedy_benchmarks_run(capsys):
    main(["projections", "--dim", "4096", "--samples", "4", "--k", "64", "--rounds", "2"])
    main(["greedy", "--components", "6", "--queries", "20", "--rounds", "2"])
    main(["sweep", "--samples", "5", "--layers", "2", "--hidden", "64", "--kv", "16", "--intermediate", "96"])
    out = capsys.readouterr().out
    for name in ("ours_gaussian", "ours_rademacher", "ours_sjlt", "greedy top1", "greedy mrr", "greedy rho"):
        assert name in out, out
    for name in ("one_at_a_time", "sweep_unshared", "sweep "):
        assert name in out, out
    worst = float(out.split("one sweep vs one at a time: worst |diff| / max |value| = ")[1].split()[0])
    assert worst < 1e-5


def test_store_benchmark_interleaves_writing_and_completes_the_store(capsys):
    main(
        [
            "store",
            "--samples",
            "5",
            "--length",
            "10",
            "--batch-size",
            "2",
            "--max-component-dim",
            "256",
            "--rounds",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert "\nextract " in out and "\nextract_and_write " in out, out
    assert "store of 5/5 rows" in out, out  # completed (and sealed) though 2 rounds write only 2 batches


def test_counts_below_one_are_refused_before_anything_runs(capsys):
    import pytest

    for argv in (["gradients", "--rounds", "0"], ["projections", "--k", "-5"], ["greedy", "--queries", "x"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--rounds must be >= 2"):
        main(["store", "--rounds", "1", "--samples", "2"])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        interleave([Contender("a", lambda r: None, lambda r: 1)], rounds=0)


@pytest.mark.slow
def test_the_similarity_benchmark_agrees_with_the_loop_and_shares_candidates_at_the_papers_overlap(capsys):
    main(
        ["similarity", "--model", "tiny", "--lengths", "16", "--candidates", "3", "--train", "6", "--rounds", "1"]
        + ["--overlap-queries", "12", "--overlap-train", "12", "--overlap-topics", "3", "--threads", "1"]
    )
    out = capsys.readouterr().out
    worst = [float(line.rsplit("= ", 1)[1]) for line in out.splitlines() if "worst |diff|" in line]
    # candidates, dense, the overlap case (and dattri-llm's in each, where it is installed)
    assert len(worst) in (3, 6) and max(worst) < 1e-6, out
    line = next(line for line in out.splitlines() if line.startswith("# samples through the model"))
    stream, loop, floor = (int(x) for x in re.findall(r"(?:stream|loop|once\)) (\d+)", line))
    assert loop == 12 * (1 + 5) and stream == floor < loop  # one unit: each distinct candidate once
    assert "\nstream " in out and "\nreference_loop " in out
    assert out.count("\nfwd_bwd ") == 3  # the floor of each case (candidates, dense, overlap)
    assert "\nfwd_bwd_activations " in out  # the dense case's floor with no weight gradient


@pytest.mark.slow
def test_the_similarity_benchmark_runs_only_the_cases_asked_for(capsys):
    main(
        ["similarity", "--model", "tiny", "--lengths", "16", "--train", "6", "--rounds", "1", "--threads", "1"]
        + ["--overlap-queries", "6", "--overlap-train", "6", "--overlap-topics", "2", "--cases", "overlap"]
    )
    out = capsys.readouterr().out
    assert "### paper overlap" in out and "--cases overlap" in out
    assert "### candidate layout, b =" not in out and "### dense layout" not in out, out


@pytest.mark.slow
def test_the_shared_case_takes_every_projection_in_the_similarity_pass(capsys):
    main(
        ["similarity", "--model", "tiny", "--lengths", "16", "--train", "6", "--rounds", "1", "--threads", "1"]
        + ["--cases", "shared", "--shared-train", "6", "--shared-queries", "4", "--projection-dims", "16", "64"]
    )
    out = capsys.readouterr().out
    assert "--cases shared --shared-train 6 --shared-queries 4" in out
    assert "(8 in all)" in out and "taken in the similarity pass: True" in out, out
    for name in ("shared_pass", "similarity_only", "fwd_bwd", "float64_products"):
        assert f"\n{name} " in out
    assert "### dense layout" not in out and "### paper overlap" not in out
    with pytest.raises(SystemExit, match="--shared-queries must be >= 2"):
        main(["similarity", "--model", "tiny", "--lengths", "16", "--cases", "shared", "--shared-queries", "1"])
