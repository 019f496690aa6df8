"""Each stage's contract (tdabench.contracts) against the rules Snakemake parses from the Snakefile,
and against the config: a rule's params change exactly when a key its contract names changes."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest

from tdabench.config import NON_RESULT_KEYS, validate_config
from tdabench.contracts import CONTRACTS, ContractError, config_keys, rule_params, sources, typed

from helpers import config_leaves

REPO = Path(__file__).resolve().parents[1]


def parsed_rules(source: str, share_pass: bool = True) -> tuple[dict, set[str]]:
    """The Snakefile's rules as Snakemake parses them (similarity.source and share_pass pick a rule
    set), and its local rules. Parsing only: no job runs, nothing is written."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    with SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(
            resource_settings=ResourceSettings(cores=2),
            config_settings=ConfigSettings(config={"similarity": {"source": source, "share_pass": share_pass}}),
            storage_settings=StorageSettings(),
            workdir=REPO,
            snakefile=REPO / "Snakefile",
        )
        workflow = wf._workflow
        return {r.name: r for r in workflow.rules if r.name != "all"}, set(workflow._localrules)


@pytest.fixture(scope="module")
def rules():
    cache, local = parsed_rules("cache")
    stream, _ = parsed_rules("stream")  # the similarity stores and projections from one pass
    apart, _ = parsed_rules("stream", share_pass=False)  # ... from a pass each
    return {**cache, **stream, **apart}, local


def test_every_contract_has_its_rule_and_every_rule_its_contract(rules):
    parsed, _ = rules
    assert sorted(parsed) == sorted(CONTRACTS)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_rule_params_code_log_and_resources_come_from_the_contract(rules, name):
    from tdabench.codedeps import stage_sources

    parsed, local = rules
    rule, contract = parsed[name], CONTRACTS[name]
    fields = [f.name for f in dataclasses.fields(contract.params)]
    # the job runner's numerics mode first (pinned before torch loads), then the contract's fields
    assert list(rule.params.keys()) == ["numerics", *fields]
    code = sorted(str((REPO / p).resolve()) for p in rule.input["code"])
    assert code == sorted(str(Path(p).resolve()) for p in stage_sources(contract.module, REPO / "src" / "tdabench"))
    assert contract.module + ".py" in " ".join(rule.input["code"]).replace("/", ".")
    assert rule.log and rule.conda_env == "../../envs/tdabench.yaml"
    if name != "summary":
        assert rule.benchmark
        # a cluster executor submits it: it must say what it needs
        assert name in local or {"mem_mb", "runtime"} <= set(rule.resources), f"{name}: neither local nor resources"


def _set(config, dotted, value):
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value


def _given(name):
    cls = CONTRACTS[name].params
    return {f: f"<{f}>" for f, source in sources(cls).items() if source.startswith("<given")}


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_params_change_exactly_when_a_key_the_contract_names_changes(name):
    """Every leaf key of the default config, changed alone: the rule's params move iff its
    contract reads the key (or a section holding it), so a config change reruns exactly the rules
    that depend on it (Snakemake reruns a job whose params changed)."""
    base = validate_config({})
    before = rule_params(name, base, **_given(name))
    read = config_keys(CONTRACTS[name].params)
    for leaf in config_leaves(base):
        changed = copy.deepcopy(base)
        _set(changed, leaf, ("changed", leaf))
        moved = rule_params(name, changed, **_given(name)) != before
        reads = (
            leaf == "numerics"
            or any(leaf == k or leaf.startswith(k + ".") for k in read)
            or ("*" in read and leaf.split(".")[0] not in NON_RESULT_KEYS)
        )
        assert moved == reads, f"rule {name}: config key {leaf} {'moves' if moved else 'does not move'} its params"


def test_contract_keys_exist_in_the_schema():
    config = validate_config({})
    paths = set(config_leaves(config))
    for contract in CONTRACTS.values():
        for key in config_keys(contract.params) - {"*"}:
            assert any(p == key or p.startswith(key + ".") for p in paths), f"{contract.rule}: {key}"


def test_a_rule_out_of_step_with_its_contract_is_refused():
    config = validate_config({})
    with pytest.raises(ContractError, match=re.escape("['model', 'shards']")):
        rule_params("gradients", config, model="m")
    with pytest.raises(ContractError, match="missing \\['budgets'\\]"):
        keys = ("selection_fraction", "n_splits", "split_seed", "objective")
        typed(CONTRACTS["selection"].params, dict.fromkeys(keys, 1))


def test_typed_params_round_trip_the_rule_params():
    config = validate_config({})
    for name, contract in CONTRACTS.items():
        params = rule_params(name, config, **_given(name))
        view = typed(contract.params, {k: v for k, v in params.items() if k != "numerics"})
        for f in dataclasses.fields(view):
            value = getattr(view, f.name)
            if dataclasses.is_dataclass(value):
                assert {k: tuple(v) if isinstance(v, list) else v for k, v in params[f.name].items()} == (
                    dataclasses.asdict(value)
                )


@pytest.mark.parametrize("name", ["pretrain", "convert", "finetune", "generate", "dataset", "selection"])
def test_stages_that_compute_no_gradient_do_not_run_the_gradient_code(name):
    """Their `code` input stays exact: editing the extractor reruns only what computes gradients."""
    from tdabench.codedeps import stage_sources

    files = {Path(p).name for p in stage_sources(CONTRACTS[name].module)}
    assert not files & {"gradients.py", "extraction.py", "gradcheck.py"}, name
