# tdabench: select or project? Gradient representations for training-data attribution.
#
#   snakemake --cores all            run the whole study (see README.md)
#   snakemake -n                     what would run, and why
#
# All logic lives in src/tdabench; the rules only wire it. Each rule passes every config value it
# uses through `params:` and lists the library files it runs as the named input `code`, so a
# config change or a code edit reruns exactly the jobs whose results depend on it.

import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# The Snakefile imports tdabench from this checkout (jobs do the same: workflow/scripts/stage.py).
SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))

from tdabench.config import NON_RESULT_KEYS, ConfigError, check_unique_keys, config_hash, validate_config
from tdabench.integrity import ENV_CONFIGFILES
from tdabench.numerics import NumericsError, check_host, mkl_vendor_shim, needs_vendor_shim

# Schema validation (defaults filled, unknown keys and wrong types refused) plus cross-key
# checks, before any job is scheduled. The schema ships with the package
# (src/tdabench/schemas/config.schema.yaml; workflow/schemas/ links to it).
try:
    for _path in workflow.configfiles:  # Snakemake's YAML reader keeps the last of a key given twice
        check_unique_keys(_path)
    _validated = validate_config(config)
except ConfigError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_validated)
# Jobs name their rebuild commands with this invocation's config files (tdabench.integrity).
os.environ[ENV_CONFIGFILES] = json.dumps([os.path.relpath(p) for p in workflow.config_settings.configfiles])
# numerics: portable needs a CPU that runs the pinned AVX2 kernels (checked where the Snakefile is
# parsed: the submit host and, on a cluster, every job's node; jobs pin the kernels themselves).
# On a CPU not Intel's, portable's jobs preload MKL's vendor shim: build it here, once, not in racing jobs.
try:
    check_host(config["numerics"])
    if config["numerics"] == "portable" and needs_vendor_shim():
        mkl_vendor_shim()
except NumericsError as e:
    raise WorkflowError(str(e)) from None


report: "workflow/report/workflow.rst"


# Bookkeeping and table work: run in the main Snakemake process, never submitted to a cluster.
localrules:
    all,
    background,
    dataset,
    bm25_candidates,
    selection,
    evaluate,
    summary,


include: "workflow/rules/common.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/gradients.smk"
include: "workflow/rules/reduce.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        "results/evaluation/metrics.parquet",
        "results/summary.md",


# Before any job runs (Snakemake calls onstart only when jobs will execute: never for dry runs or
# when nothing is to be done): the device must exist where jobs run locally (a submit host without
# GPUs may still submit to a cluster), and this invocation's tracking record is opened: jobs record
# their runs beside it, and the end of the study logs them to MLflow (tdabench.tracking).
onstart:
    if workflow.local_exec and config["device"] not in ("auto", "cpu"):  # those always resolve (no torch import)
        from tdabench.device import DeviceError, resolve_device

        try:
            resolve_device(config["device"])
        except DeviceError as e:
            raise WorkflowError(f"{e} (checked before any job runs, local executor)") from None
    if config["mlflow"]["enabled"]:
        from tdabench import tracking

        tracking.start_study(config, workdir=os.getcwd(), repo=workflow.basedir, cfg_hash=config_hash(config))
        problem = tracking.store_problem(config["mlflow"]["tracking_uri"], os.getcwd())
        if problem:
            print(f"[tdabench] {problem}: the study runs, and its MLflow runs wait (tdabench log)")


# The end of the study logs its recorded runs to MLflow, under mlflow.deadline_s.
onsuccess:
    if config["mlflow"]["enabled"]:
        from tdabench.mlflow_log import end_of_study

        print(f"[tdabench] {end_of_study('FINISHED', config['mlflow'], SRC)}")
    from tdabench.evaluate import answer_text

    print(answer_text(config["mlflow"]), end="")


onerror:
    if config["mlflow"]["enabled"]:
        from tdabench.mlflow_log import end_of_study

        print(f"[tdabench] {end_of_study('FAILED', config['mlflow'], SRC)}")
