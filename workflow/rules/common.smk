# Shared helpers: each rule's params and code from its stage contract (tdabench.contracts), the
# study's file plan (tdabench.plan), and what each job asks the scheduler for (tdabench.resources).

from tdabench import plan, resources
from tdabench.codedeps import stage_sources
from tdabench.contracts import CONTRACTS, rule_params

# Every rule runs its stage through one script (the contract names the entry point) in one conda
# environment (for --sdm conda users).
STAGE = "../scripts/stage.py"
ENV = "../../envs/tdabench.yaml"
SETTINGS = plan.settings(config)


def stage_code(rule):
    """Library files the rule's stage runs (module + transitive tdabench imports), relative to the
    working directory so that moving the checkout together with its results reruns nothing."""
    return [os.path.relpath(p) for p in stage_sources(CONTRACTS[rule].module, SRC / "tdabench")]


def stage_params(rule, **given):
    """The rule's params: exactly the config keys its contract names, plus the values only the
    rule knows (`given`), so a config change reruns exactly the rules that read the key."""
    return rule_params(rule, config, **given)


def local(ref):
    """`ref` as a Snakemake input when it is a file or folder (a hub name is not)."""
    return [ref] if ref.startswith("results/") or os.path.exists(ref) else []


def model_param(ref):
    """Params value of a model: the rule's `model` input when local, else the hub name."""
    return lambda wildcards, input: input.model[0] if local(ref) else ref


BASE_MODEL = plan.base_model(config)
ATTRIBUTED_MODEL = plan.attributed_model(config)
QUERY_TABLE = plan.query_table(config)


def gradient_shards(split):
    return plan.gradient_shards(config, split)


wildcard_constraints:
    split="train|queries",
    shard=r"\d+",
    part=r"\d+",
    setting=r"[a-z_]+",
    method=r"[a-z_]+",


def max_threads():
    """Most threads of any job: resources.threads, else the invocation's --cores (locally), else
    resources.cluster_threads (a cluster executor has no --cores). Snakemake also caps at --cores
    locally."""
    cores = workflow.resource_settings.cores
    local_cores = cores if isinstance(cores, int) and not workflow.resource_settings.nodes else None
    return plan.model_threads(config, local_cores)


def model_resources(name, rows=lambda wildcards, input: 0, queries=None):
    """Resources of the model-running rule `name`. Memory and runtime come from the model's size, the rows
    one job handles (`rows(wildcards, input)`), for a streamed similarity job the queries it holds
    (`queries(wildcards, input)`), and the attempt; gpu is added when device is cuda."""

    def get(key):
        def value(wildcards, input, attempt):
            held = None if queries is None else queries(wildcards, input)
            return resources.estimate(name, config, rows(wildcards, input), attempt, queries=held)[key]

        return value

    res = {"mem_mb": get("mem_mb"), "runtime": get("runtime")}
    if plan.requests_gpu(config, name):
        res["gpu"] = plan.gpus(config)
    return res


def io_resources():
    """Resources of a store- and table-reading job, which grow with its input size."""

    def get(key):
        return lambda wildcards, input, attempt: resources.estimate_io(config, input.size_mb, attempt)[key]

    return {"mem_mb": get("mem_mb"), "runtime": get("runtime")}


def rows_of(name):
    """rows(wildcards, input) of the table named `name` among a rule's inputs."""
    return lambda wildcards, input: resources.table_rows(input[name], config)


def queries_held(wildcards, input):
    """The rows of a rule's query table once it exists (None before: the estimate assumes as many
    per setting as training examples)."""
    return resources.table_rows(input.queries, config) if Path(input.queries).is_file() else None


def samples_of(*names):
    """rows(wildcards, input): the rows of the tables named `names` among a rule's inputs, together."""
    return lambda wildcards, input: sum(resources.table_rows(input[n], config) for n in names)


def gradient_job_rows(wildcards, input):
    """Rows of one gradients job: its split's table over the split's shards."""
    table = input.train if wildcards.split == "train" else input.queries
    return -(-resources.table_rows(table, config) // plan.n_shards(config, wildcards.split))
