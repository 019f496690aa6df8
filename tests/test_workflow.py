"""The workflow end to end on a micro config in a temporary copy of the repository.

One run builds everything; later tests ask Snakemake what a change would rerun (dry runs), check
the MLflow store, and check that bad configs fail before any job. The code-edit test comes last:
it touches the copy's sources.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import h5py
import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from tdabench.resources import MODEL_RULES

from workflow_helpers import (
    REPO,
    SNAKEMAKE,
    copy_repo,
    job_stats,
    mlflow_server,
    planned,
    snakemake,
    write_config,
)

CLI = str(Path(sys.executable).with_name("tdabench"))
MICRO = {
    "dataset": {
        "synthetic": {"n_entities": 12, "background_facts_per_entity": 2, "planted_facts": 18},
        "generate_max_tokens": 12,
    },
    "model": {"tiny": {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "num_layers": 2, "num_heads": 2}},
    "tokenize": {"max_length": 64},
    "pretrain": {"epochs": 2, "batch_size": 8},
    "finetune": {"epochs": 2, "batch_size": 8},
    "gradients": {
        "components": ["q", "k", "v", "o", "gate", "up", "down", "lm_head", "embed"],
        "batch_size": 16,
        "shards": 2,
        "max_component_dim": 600,
    },  # embed, lm_head sketched
    "selection": {"n_splits": 2},
    "projection": {"dims": [8, 16], "seeds": [0]},
    "evaluation": {"cost_samples": 4},
}
NO_MLFLOW = {"mlflow": {"enabled": False}}  # for the runs after the MLflow checks: less to wait for
MICRO_METHODS = ("sjlt", "blockwise", "blockwise_unnormalized", "select_then_project")  # config.yaml's
pytestmark = pytest.mark.workflow


def runs(root):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tdabench")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def planned_with(root, cfg) -> dict[str, int]:
    """What Snakemake would run under `cfg` (a dry run); the micro config is restored afterwards."""
    write_config(root, cfg)
    try:
        return planned(root)
    finally:
        write_config(root, MICRO)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("study"))
    write_config(root, MICRO)
    first = snakemake(root)
    (root / "first_run.log").write_text(first.stdout + first.stderr)
    return root, job_stats(first.stdout + first.stderr)


def test_first_run_builds_every_output(study):
    root, stats = study
    assert stats["gradients"] == 3  # 2 train shards + 1 query shard
    assert stats["projection"] == 3  # sjlt, blockwise, blockwise_unnormalized
    table = pl.read_parquet(root / "results/evaluation/metrics.parquet")
    assert {
        "setting",
        "split",
        "method",
        "variant",
        "dim",
        "bytes_per_sample",
        "seconds_per_sample",
        "top1",
        "mrr",
        "recall_at_10",
        "components",
        "k",
        "seed",
    } <= set(table.columns)
    assert {
        "full",
        "single",
        "family",
        "best_single",
        "greedy",
        "greedy_step",
        "greedy_budget",
        "projection",
        "select_then_project",
        "bm25",
        "chance",
    } <= set(table["method"])
    proj = table.filter(
        (pl.col("method") == "projection") & (pl.col("split") == 0) & (pl.col("setting") == "paraphrased")
    )
    assert proj.group_by("variant").agg(pl.col("k").sort()).sort("variant")["k"].to_list() == [[8, 16]] * 3
    assert (table["n_queries"] == 9).all()  # 18 queries per setting, half held out
    assert set(table["setting"]) == {"paraphrased", "model_generated"}
    assert table["split"].unique().sort().to_list() == [0, 1]
    assert table.filter((pl.col("method") == "single") & (pl.col("split") == 0)).height == 2 * (2 * 7 + 2)  # 2 settings
    headline = table.filter(pl.col("method").is_in(["full", "best_single", "greedy", "projection"]))
    assert headline["seconds_per_sample"].is_not_null().all() and (headline["dim"] > 0).all()
    summary = (root / "results/summary.md").read_text()
    assert "## paraphrased" in summary and "- paraphrased: " in summary and "from the gradient cache" in summary
    with h5py.File(root / "results/gradients/train/shard-1.h5") as f:  # embed and lm_head are sketched
        info = {c["name"]: c for c in json.loads(f.attrs["components"])}
        assert info["lm_head.weight"]["stored_dim"] == 600 and info["lm_head.weight"]["sketch"]["k"] == 600
        assert f["grads/lm_head.weight"].shape == (21, 600)  # 24 background + 18 planted in 2 shards
        assert f["grads/model.layers.0.mlp.up_proj.weight"].shape == (21, 32 * 16)  # exact
    assert (root / "results/evaluation/top1_vs_dim.png").stat().st_size > 1000
    queries = pl.read_parquet(root / "results/data/queries_all.parquet")
    generated = queries.filter(pl.col("setting") == "model_generated")
    assert generated.height == 18 and generated["states_fact"].dtype == pl.Boolean
    paraphrased = queries.filter(pl.col("setting") == "paraphrased")
    assert generated["prompt"].to_list() == paraphrased["prompt"].to_list()
    assert generated["source_id"].to_list() == paraphrased["source_id"].to_list()
    for log in ("background", "pretrain", "dataset", "finetune", "generate", "gradients/train-1", "evaluate"):
        assert (root / f"logs/{log}.log").read_text().strip()


def test_the_manifest_lists_every_result_and_verify_names_missing_and_changed_ones(study):
    import hashlib
    import os

    root, _ = study
    files = json.loads((root / "results/manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(root)) for p in (root / "results").rglob("*") if p.is_file()}
    on_disk = {name for name in on_disk if not Path(name).name.startswith(".")}  # Snakemake's timestamps
    assert set(files) == on_disk - {"results/manifest.json"}  # every result file ...
    owners = {"results/data/train.parquet": "dataset", "results/similarity/paraphrased.h5": "similarity"}
    owners |= {"results/models/finetuned/config.json": "finetune", "results/summary.md": "summary"}
    assert {name: files[name]["rule"] for name in owners} == owners  # ... with the rule that wrote it
    for name in owners:
        assert files[name]["sha256"] == hashlib.sha256((root / name).read_bytes()).hexdigest()
    assert subprocess.run([CLI, "verify"], cwd=root, capture_output=True, text=True).returncode == 0

    train, selection = root / "results/data/train.parquet", root / "results/selection/paraphrased.parquet"
    kept = {p: (p.read_bytes(), p.stat()) for p in (train, selection)}
    table = pl.read_parquet(train)
    ids = table["id"].to_list()
    ids[0], ids[1] = ids[1], ids[0]  # two ids swapped: the table still reads, with the right columns
    table.with_columns(pl.Series("id", ids)).write_parquet(train)
    selection.unlink()
    try:
        r = subprocess.run([CLI, "verify"], cwd=root, capture_output=True, text=True)
    finally:
        for path, (data, stat) in kept.items():  # as it was, mtime included: nothing reruns after
            path.write_bytes(data)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert r.returncode == 1
    assert (
        "results/data/train.parquet: its bytes changed since rule dataset wrote it; "
        "rebuild it with: snakemake --cores all --force results/data/train.parquet"
    ) in r.stdout
    assert "results/selection/paraphrased.parquet: missing (written by rule selection)" in r.stdout


def test_mlflow_has_one_parent_and_one_child_per_job(study):
    root, stats = study
    client, all_runs = runs(root)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    n_jobs = sum(n for rule, n in stats.items() if rule != "all")
    assert len(children) == n_jobs
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    by_rule = {}
    for r in children:
        by_rule[r.data.tags["tdabench.rule"]] = by_rule.get(r.data.tags["tdabench.rule"], 0) + 1
        assert r.info.run_name.split()[0] == r.data.tags["tdabench.rule"]
        assert r.data.params, r.info.run_name
        assert r.data.metrics, r.info.run_name
        assert r.info.status == "FINISHED"
    assert by_rule == {rule: n for rule, n in stats.items() if rule != "all"}
    for r in children:  # jobs that run a model sample CPU and RAM (MLflow's system metrics); table jobs do not
        sampled = "system/system_memory_usage_megabytes" in r.data.metrics
        assert sampled == (r.data.tags["tdabench.rule"] in set(MODEL_RULES) - {"convert"}), r.info.run_name
    assert parent.info.status == "FINISHED"
    assert len(parent.data.metrics) >= 10 and "paraphrased.greedy.top1" in parent.data.metrics
    assert {"tdabench.config_hash", "tdabench.git_commit"} <= set(parent.data.tags)
    assert {d.dataset.name for d in client.get_run(parent.info.run_id).inputs.dataset_inputs} == {"train", "queries"}
    summary = next(r for r in children if r.info.run_name == "summary")
    methods = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == summary.info.run_id]
    assert {r.data.params["method"] for r in methods} >= {"full", "greedy", "best_single", "projection", "bm25"}
    for r in methods:  # named method first; numbers as numbers; params that do not apply left out
        params, name = r.data.params, r.info.run_name
        assert name.endswith(f" · {params['setting']}") and "top1" in r.data.metrics, name
        assert ("k" in params) == (params["method"] in ("projection", "select_then_project")), name
        assert all(v not in ("", "None") for v in params.values()), name
        if "dim" in params:  # step = dimension: top-1 against the dimension on one chart per setting
            history = client.get_metric_history(r.info.run_id, f"{params['setting']}/top1_vs_dim")
            assert int(params["dim"]) in {m.step for m in history}, name
    greedy = next(r for r in methods if r.info.run_name == "greedy · paraphrased")
    assert len(client.get_metric_history(greedy.info.run_id, "paraphrased/top1_vs_dim")) > 1  # its prefixes
    assert {r.info.run_name for r in methods} >= {"full · paraphrased", "sjlt k=8 · model_generated"}
    assert len(methods) + len(children) + 1 == len(all_runs)  # nothing else was logged
    manifest = client.download_artifacts(
        [r for r in children if r.info.run_name.startswith("gradients")][0].info.run_id, "manifest.json"
    )
    assert "grads/lm_head.weight" in Path(manifest).read_text()  # a manifest, not the cache


def test_the_study_ends_with_its_answer(study):
    root, _ = study
    lines = [x for x in (root / "first_run.log").read_text().splitlines() if x.startswith("[tdabench] ")]
    start = lines.index(next(x for x in lines if x.startswith("[tdabench] MLflow: ")))
    tail = lines[start : start + 4]  # onsuccess prints these last (stdout; the job lines are stderr)
    assert "#/experiments/" in tail[0] and "workflowType=machine_learning" in tail[0]  # the runs table's link
    heads = [x.split(":")[0].removeprefix("[tdabench] ") for x in tail[1:]]
    assert heads == ["paraphrased", "model_generated", "report"]
    for line in tail[1:3]:
        assert " top-1 full gradient " in line and "best selection" in line and "best projection" in line, line
        assert "BM25" in line
    assert tail[3].startswith("[tdabench] report: results/summary.md   MLflow UI: ")
    assert (root / "results/answer.txt").read_text().splitlines() == [x.removeprefix("[tdabench] ") for x in tail[1:3]]


def test_complete_run_has_nothing_to_do_and_creates_no_run(study):
    root, _ = study
    assert planned(root) == {}
    _, before = runs(root)
    again = snakemake(root)
    assert "Nothing to be done" in again.stdout + again.stderr
    _, after = runs(root)
    assert len(after) == len(before)


def reruns_table() -> dict[str, set[str]]:
    """docs/running.md's table of what a change reruns: {change: rules (backticked, outside brackets)}."""
    text = (REPO / "docs" / "running.md").read_text()
    table = text.split("<!-- reruns-table")[1].split("<!-- /reruns-table -->")[0]
    rows = {}
    for line in table.splitlines()[3:]:  # the comment's end, the header and the rule line
        change, reruns = (cell.strip() for cell in line.strip("|").split("|"))
        rows[change] = set(re.findall(r"`([a-z_]+)`", re.sub(r"\(.*?\)", "", reruns)))
    return rows


def edit_gradient_code(root):
    """A comment added to src/tdabench/gradients.py (the stage code digest sees any byte)."""
    path = root / "src/tdabench/gradients.py"
    path.write_text(path.read_text() + "\n# edited\n")


# One dry run per row of the docs' table; each row's change as the test makes it.
RERUN_CHANGES = {
    "`evaluation.recall_at`": {"evaluation": {**MICRO["evaluation"], "recall_at": [1, 3]}},
    "`projection.dims`": {"projection": {**MICRO["projection"], "dims": [8, 12]}},
    "`selection.objective`": {"selection": {**MICRO["selection"], "objective": "top1"}},
    "edit `src/tdabench/gradients.py`": edit_gradient_code,
    "`mlflow.experiment`, `resources.mem_scale`": {
        "mlflow": {"enabled": False, "experiment": "other"},
        "resources": {"threads": 1, "mem_scale": 3.0, "model_parameters": 10**9},
    },
}


def test_the_docs_rerun_table_lists_every_change_the_test_makes():
    assert set(reruns_table()) == set(RERUN_CHANGES)


@pytest.mark.parametrize("change", list(RERUN_CHANGES))
def test_each_change_in_the_docs_reruns_what_the_docs_say(study, change):
    root, _ = study
    how = RERUN_CHANGES[change]
    if callable(how):
        source = root / "src/tdabench/gradients.py"
        before = source.read_text()
        how(root)
        try:
            stats = planned(root)
        finally:
            source.write_text(before)
    else:
        stats = planned_with(root, {**MICRO, **how})
    assert set(stats) - {"all"} == reruns_table()[change], stats


def with_synthetic(**changes) -> dict:
    return {**MICRO, "dataset": {**MICRO["dataset"], "synthetic": {**MICRO["dataset"]["synthetic"], **changes}}}


def test_planted_settings_do_not_rerun_pretraining(study):
    root, _ = study
    stats = planned_with(root, with_synthetic(planted_facts=16, query_templates=2))
    assert "pretrain" not in stats and "background" not in stats
    assert {"dataset", "finetune", "generate", "gradients", "evaluate"} <= set(stats)
    # The background itself did change: the base model must be trained again.
    assert {"background", "pretrain", "dataset", "finetune"} <= set(
        planned_with(root, with_synthetic(background_facts_per_entity=3))
    )


@pytest.mark.parametrize(
    "override,key",
    [
        (["foo=1"], "foo"),
        (["seed=abc"], "seed"),
        (['projection={"dims": [100000000]}'], "projection.dims[0]"),
    ],
)
def test_bad_config_fails_before_any_job(study, override, key):
    root, _ = study
    _, before = runs(root)
    r = snakemake(root, "--config", *override, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert key in out
    assert "rule " not in out and "localrule" not in out
    _, after = runs(root)
    assert len(after) == len(before)


def test_a_config_file_with_a_key_twice_fails_before_any_job(study):
    root, _ = study
    (root / "dup.yaml").write_text("seed: 3\nseed: 4\n")
    r = snakemake(root, "-n", "--configfile", "dup.yaml", check=False)
    assert r.returncode != 0 and "dup.yaml, line 2: key 'seed' is given twice (first at line 1)" in r.stdout + r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA")
def test_cuda_without_cuda_fails_before_any_job_with_the_local_executor(tmp_path):
    root = copy_repo(tmp_path / "cuda")
    write_config(root, MICRO)
    r = snakemake(root, "--config", "device=cuda", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "config key device is 'cuda', but CUDA is not available" in out and "before any job runs" in out
    assert not (root / "results").exists() and not (root / "logs").exists() and not (root / "mlflow.db").exists()


def test_the_published_profile_plans_offline(study):
    """config/studies/lima.yaml: a dry run needs no hub (HF_HUB_OFFLINE=1 here). Nothing is cached
    or projected: the candidate sets are computed once and the stores streamed, exact."""
    root, _ = study
    stats = planned(root, "--configfile", "config/studies/lima.yaml")
    assert stats["bm25_candidates"] == 1 and stats["similarity_stream"] == 1 and stats["similarity_merge"] == 2
    assert not {"gradients", "pretrain", "finetune", "projection", "project_selected", "similarity"} & set(stats)


def test_lint_reports_nothing(study):
    root, _ = study
    r = subprocess.run([SNAKEMAKE, "--lint"], cwd=root, capture_output=True, text=True, timeout=300)
    assert "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_report_is_self_contained_with_plots_and_config(study):
    root, _ = study
    snakemake(root, "--report", "report.html")
    html = (root / "report.html").read_text()
    assert len(html) > 100_000  # images and data are embedded
    for text in (
        "Select vs project",
        "Where the signal lives",
        "Configuration",
        "top1_vs_dim.png",
        "single_component_heatmap.png",
        "greedy_curve.png",
        "top1_vs_cost.png",
    ):
        assert text in html, text
    for plot in ("top1_vs_dim", "mrr_vs_dim", "single_component_heatmap", "greedy_curve", "top1_vs_cost"):
        for ext in ("png", "svg"):
            assert (root / f"results/evaluation/{plot}.{ext}").stat().st_size > 1000
    table = pl.read_parquet(root / "results/evaluation/metrics.parquet")
    assert {"top1_lo", "top1_hi", "mrr_lo", "mrr_hi", "recall_at_10_lo", "recall_at_10_hi"} <= set(table.columns)
    full = table.filter(pl.col("method") == "full")
    assert ((full["top1_lo"] <= full["top1"]) & (full["top1"] <= full["top1_hi"])).all()
    per_query = pl.read_parquet(root / "results/evaluation/per_query.parquet")
    assert {"query_id", "method", "rank", "margin"} <= set(per_query.columns)
    assert per_query.filter((pl.col("method") == "full") & (pl.col("split") == 0)).height == 9 * 2  # 2 settings


@pytest.mark.browser
def test_mlflow_ui_and_report_in_a_real_browser(study, tmp_path):
    import os

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "Debian chromium is not installed (apt-get install chromium); .ci/run installs it"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    root, _ = study
    client, all_runs = runs(root)
    parent = next(r for r in all_runs if r.data.tags.get("tdabench.kind") == "study")
    exp_id = parent.info.experiment_id
    with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", tmp_path / "server.log") as base:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                user_data_dir=str(tmp_path / "profile"),
                executable_path=chromium,
                headless=True,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--no-first-run",
                ],
                viewport={"width": 1400, "height": 2400},  # chart cards render only when in view
            )
            page = browser.new_page()
            page.goto(f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
            page.get_by_text(parent.info.run_name).first.wait_for(timeout=90_000)  # the parent run
            page.screenshot(path=str(root / "results" / "mlflow_ui_runs.png"))
            page.goto(f"{base}/#/experiments/{exp_id}/runs/{parent.info.run_id}?workflowType=machine_learning")
            page.get_by_text("evaluate", exact=True).first.wait_for(timeout=90_000)  # a child run
            page.get_by_text("paraphrased.greedy.top1").first.wait_for(timeout=90_000)  # a metric
            page.screenshot(path=str(root / "results" / "mlflow_ui_parent.png"))
            # Select vs project on one chart: the chart view of one setting's method runs, nested
            # under `summary` (its first 10 visible rows are plotted: the filter keeps greedy,
            # best_single and the projections).
            keep = " and ".join(
                f"params.method != '{m}'" for m in ("select_then_project", "bm25", "chance", "greedy_budget", "full")
            )
            search = quote(f"params.setting = 'paraphrased' and {keep}")
            page.goto(
                f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"
                f"&searchFilter={search}"
            )
            page.get_by_text("summary", exact=True).first.wait_for(timeout=90_000)  # the method runs' parent
            page.locator('.ag-row button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()  # expand
            page.get_by_text("greedy · paraphrased", exact=True).first.wait_for(timeout=60_000)
            title = page.locator('h4[title="paraphrased/top1_vs_dim"]')
            card = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(has=title).first
            card.wait_for(timeout=90_000)
            card.scroll_into_view_if_needed()
            plot = card.locator(".js-plotly-plot").first
            plot.wait_for(timeout=60_000)
            page.wait_for_function(
                "g => g.data && g.data.some(t => t.x && t.x.length) && g.querySelectorAll('g.trace').length > 0",
                arg=plot.element_handle(),
                timeout=60_000,
            )
            series = plot.evaluate("g => [...new Set(g.data.filter(t => t.x && t.x.length).map(t => t.name))]")
            assert "greedy · paraphrased" in series, series  # a selection
            assert any(name.startswith("sjlt k=") for name in series), series  # a projection
            assert plot.evaluate("g => g.layout.xaxis.title.text") == "Step"  # step = the dimension
            card.screenshot(path=str(root / "results" / "mlflow_ui_select_vs_project.png"))
            if not (root / "report.html").exists():  # test_report_is_self_contained_with_plots_and_config made it
                snakemake(root, "--report", "report.html")
            page.goto((root / "report.html").as_uri())
            page.get_by_text("Select vs project").first.wait_for(timeout=30_000)
            browser.close()
        assert (root / "results" / "mlflow_ui_parent.png").stat().st_size > 10_000


def test_mlflow_runs_carry_source_tags_curves_and_tables(study):
    root, _ = study
    client, all_runs = runs(root)
    for r in all_runs:  # parent, jobs and per-method runs alike
        assert {"mlflow.source.git.commit", "tdabench.config_hash"} <= set(r.data.tags), r.info.run_name
    parent = next(r for r in all_runs if "mlflow.parentRunId" not in r.data.tags)
    by_k = client.get_metric_history(parent.info.run_id, "paraphrased.sjlt.top1_vs_k")
    assert sorted(m.step for m in by_k) == MICRO["projection"]["dims"]
    by_step = client.get_metric_history(parent.info.run_id, "paraphrased.greedy.top1_vs_step")
    assert sorted(m.step for m in by_step)[:3] == [1, 2, 3]
    selection = next(r for r in all_runs if r.info.run_name == "selection setting=paraphrased")
    assert len(client.get_metric_history(selection.info.run_id, "greedy_mrr_split1")) >= 3
    headline = json.loads(Path(client.download_artifacts(parent.info.run_id, "results/headline.json")).read_text())
    assert {"method", "top1", "mrr"} <= set(headline["columns"]) and headline["data"]
    assert '"type": "table"' in parent.data.tags["mlflow.loggedArtifacts"]


def test_readme_block_is_rendered_from_results_and_a_hand_edit_fails_the_check(study, tmp_path):
    from tdabench.dev import docs

    root, _ = study
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- tdabench:begin default-study -->\n<!-- tdabench:end default-study -->\n\ntail\n")
    assert docs.render(readme, root) == ["default-study"]
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith("\n\ntail\n")
    assert "| full gradient | " in text and "training examples" in text
    assert docs.check(readme, root, ["default-study"]) == []
    full = next(line for line in text.splitlines() if line.startswith("| full gradient |"))
    number = re.search(r"\d\.\d{3}", full.split("|")[3]).group(0)
    edited = full.replace(number, f"{float(number) + 0.001:.3f}", 1)
    readme.write_text(text.replace(full, edited))
    problems = docs.check(readme, root, ["default-study"])
    assert len(problems) == 1 and "block default-study differs" in problems[0] and edited in problems[0]
    with pytest.raises(SystemExit):
        docs.main(["check", "--readme", str(readme), "--root", str(root)])
    # Strict on any machine: the marker records the run's numerics mode and CPU, and excuses nothing.
    assert "numerics=portable cpu=" in text.splitlines()[2]
    readme.write_text(
        text.replace(full, edited).replace("numerics=portable cpu=", "numerics=portable cpu=Other/AVX512 x=")
    )
    assert len(docs.check(readme, root, ["default-study"])) == 1


def test_stale_flags_follow_the_code_digest(tmp_path):  # no study needed
    from tdabench.dev import docs

    digest = docs.current_digest()
    readme = tmp_path / "README.md"

    def block(code, flagged):
        stale = "> **Stale:** old numbers\n" if flagged else ""
        return f"<!-- tdabench:begin smollm2-study code={code} -->\n{stale}| t |\n<!-- tdabench:end smollm2-study -->\n"

    for code, flagged, ok in [(digest, False, True), ("0ld", True, True), ("0ld", False, False), (digest, True, False)]:
        readme.write_text(block(code, flagged))
        assert (docs.check_stale_flags(readme) == []) == ok, (code, flagged)


def test_auto_streams_when_the_cache_would_not_fit_and_nothing_then_builds_it(study):
    root, _ = study
    cfg = {
        **MICRO,
        "gradients": {**MICRO["gradients"], "max_cache_gb": 1e-6},
        "similarity": {"source": "auto"},
    }
    stats = planned_with(root, cfg)
    assert stats["similarity_stream"] == 1 and stats["similarity_merge"] == 2  # one pass for both settings
    assert stats["projection_stream"] == 1 and stats["project_selected_stream"] == 1  # projections: one pass
    assert not {"gradients", "projection", "project_selected"} & set(stats)
    # Only select-then-project: still the pass, which keeps the blocks select-then-project sums
    only_selected = {**cfg, "projection": {**MICRO["projection"], "methods": ["select_then_project"]}}
    assert planned_with(root, only_selected)["projection_stream"] == 1
    # No select-then-project: the pass keeps no blocks, and nothing sums them
    no_selected = {**cfg, "projection": {**MICRO["projection"], "methods": ["sjlt"]}}
    assert "project_selected_stream" not in planned_with(root, no_selected)
    # The same with room for the cache: auto keeps the cached path (nothing of it to redo)
    assert "similarity_stream" not in planned_with(root, {**cfg, "gradients": MICRO["gradients"]})


def test_streamed_similarity_in_shards_gives_the_cached_stores(study):
    """similarity.source stream: two training shards, each one pass writing both settings' parts,
    merged per setting; no gradient job reruns, and the store equals the cached one (the same
    batches, the same count sketches) and says where it came from (the summary prints that line:
    test_first_run_builds_every_output). One setting's store is merged: the other's merge is the
    same code on its parts, and the analysis downstream of a store does not care which producer
    wrote it."""
    from tdabench.similarity import load_similarity, read_provenance

    root, _ = study
    snakemake(root, "--touch")  # earlier tests edited code: outputs count as current, nothing reruns by itself
    store = "results/similarity/paraphrased.h5"
    cached = load_similarity(root / store)
    cfg = {**MICRO, "similarity": {"source": "stream", "shards": 2, "max_component_dim": 600}, **NO_MLFLOW}
    write_config(root, cfg)
    try:
        stats = planned(root)
        assert stats["similarity_stream"] == 2 and stats["similarity_merge"] == 2  # a pass per shard: both settings
        assert not {"gradients", "pretrain", "finetune", "similarity"} & set(stats)
        r = snakemake(root, store)
        built = job_stats(r.stdout + r.stderr)
    finally:
        write_config(root, MICRO)
    assert built == {"similarity_stream": 2, "similarity_merge": 1}
    got = load_similarity(root / store)
    assert got.attrs["source"] == "stream" and got.attrs["n_shards"] == 2
    assert got.component_method == cached.component_method  # embed and lm_head sketched alike
    assert abs(got.scores() - cached.scores()).max() < 1e-9
    for c in range(len(got.components)):
        assert abs(got.scores([c]) - cached.scores([c])).max() < 1e-9
    assert (root / "results/similarity/paraphrased/part-1.h5").exists()
    assert (root / "results/similarity/model_generated/part-1.h5").exists()  # the same passes wrote it
    assert "streamed from the model" in read_provenance(root / store)
    assert "from the gradient cache" in read_provenance(root / "results/similarity/model_generated.h5")


@pytest.mark.parametrize("shards", [1, 2])
def test_streamed_projections_give_the_cached_files(study, shards):
    """similarity.source stream: the projections come from the model in one pass for every method
    (and select-then-project from the blocks that pass keeps), with no gradient job, and equal
    the cached files (the same gradients, up to float32 rounding: the cache batches the training
    examples per shard, the pass over the whole table). One similarity shard: that pass is the
    similarity job's (similarity_projection_stream); two: projection_stream's own."""
    from tdabench.projection_files import read_projections

    root, _ = study
    snakemake(root, "--touch")
    methods = [m for m in MICRO_METHODS if m != "select_then_project"]
    targets = [f"results/projection/{m}.h5" for m in methods]
    targets += [f"results/projection/select_then_project/{s}.h5" for s in ("paraphrased", "model_generated")]
    ids = pl.read_parquet(root / "results/data/queries_all.parquet")["id"].to_list()
    cached = {t: read_projections(root / t, ids) for t in targets}
    cfg = {**MICRO, "similarity": {"source": "stream", "shards": shards, "max_component_dim": 600}, **NO_MLFLOW}
    write_config(root, cfg)
    try:
        r = snakemake(root, *targets)
        built = job_stats(r.stdout + r.stderr)
    finally:
        write_config(root, MICRO)
    pass_ = "similarity_projection_stream" if shards == 1 else "projection_stream"
    assert built.get(pass_) == 1 and built.get("project_selected_stream") == 1, built
    assert not {"gradients", "projection", "project_selected"} & set(built)
    if shards == 1:
        log = (root / "logs/similarity/stream-projections.log").read_text()
        assert "taken from the similarity pass" in log and "1 units (0 resumed)" in log
    for t in targets:
        got = read_projections(root / t, ids)
        assert [(p.method, p.k, p.seed, p.split, p.components) for p in got] == [
            (p.method, p.k, p.seed, p.split, p.components) for p in cached[t]
        ], t
        for a, b in zip(got, cached[t]):
            for x, y in ((a.train, b.train), (a.queries, b.queries)):
                assert abs(x - y).max() <= 1e-4 * abs(y).max(), (t, a.k, a.seed)


def test_a_corrupted_shard_stops_its_readers_and_the_named_command_rebuilds_it(study):
    """Run last: it corrupts the study's first training shard, then repairs it."""
    root, _ = study
    write_config(root, {**MICRO, **NO_MLFLOW})  # mlflow.* reruns nothing (test_scheduling_keys_rerun_nothing)
    snakemake(root, "--touch")  # earlier tests edited code: outputs count as current, nothing reruns by itself
    shard = "results/gradients/train/shard-0.h5"
    with h5py.File(root / shard, "r+") as f:  # a bit of rot in one gradient
        name = next(iter(f["grads"]))
        f["grads"][name][0, 0] += 1.0
    r = subprocess.run([CLI, "verify"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 1 and f"{shard}: dataset grads/{name} does not match its checksum" in r.stdout
    r = snakemake(root, "--forcerun", "similarity", check=False)
    assert r.returncode != 0
    # whichever reader Snakemake started first failed (it starts no new job after a failure): a
    # similarity job, or a projection job (the corruption made the shard newer than its outputs)
    logs = [*(root / "logs/similarity").glob("*.log"), *(root / "logs/projection").glob("*.log")]
    log = "".join(p.read_text() for p in logs)
    assert "does not match its checksum" in log and f"snakemake --cores all --force {shard}" in log
    snakemake(root, "--force", shard)  # the command the message names
    r = subprocess.run([CLI, "verify"], cwd=root, capture_output=True, text=True)
    assert shard not in r.stdout  # sound again; what is left is the failed readers' outputs, which
    # Snakemake removed: the manifest names them missing, and the next full run rebuilds them
    assert r.stdout.strip() and all("missing (written by rule" in line for line in r.stdout.splitlines())
