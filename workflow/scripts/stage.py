# The one script every rule runs: unpack the Snakemake job and run the rule's stage
# (rule -> entry point: tdabench.contracts.CONTRACTS; logic: src/tdabench/pipeline/<stage>.py).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821  (this checkout's tdabench)
# The numerics mode's CPU kernel pins must be in the environment before torch is imported.
from tdabench import numerics  # noqa: E402  (imports nothing heavy)

numerics.pin_environment(snakemake.params.numerics)  # noqa: F821
numerics.restart_for_shim()  # on a CPU not Intel's: MKL's vendor shim loads only at process start
from tdabench.pipeline import common  # noqa: E402

common.run_job(common.JobContext.from_snakemake(snakemake))  # noqa: F821
