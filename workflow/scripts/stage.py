# The one script every rule runs: unpack the Snakemake job and run the rule's stage
# (rule -> entry point: tdabench.contracts.CONTRACTS; logic: src/tdabench/pipeline/<stage>.py).
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821  (this checkout's tdabench)
# The numerics mode's CPU kernel pins must be in the environment before torch is imported.
from tdabench import numerics  # noqa: E402  (imports nothing heavy)

numerics.pin_environment(snakemake.params.numerics)  # noqa: F821
if numerics.restart_needed():  # MKL's vendor shim (a CPU not Intel's) loads only at process start
    if os.environ.get("TDABENCH_RESTARTED"):  # started again and still without it: the loader refused it
        sys.exit(
            f"numerics: portable: the dynamic loader did not preload MKL's vendor shim (LD_PRELOAD="
            f"{os.environ['LD_PRELOAD']}; its message is above); run with numerics: native instead"
        )
    os.environ["TDABENCH_RESTARTED"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
from tdabench.pipeline import common  # noqa: E402

common.run_job(common.JobContext.from_snakemake(snakemake))  # noqa: F821
