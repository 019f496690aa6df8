# Thin wrapper: unpack the Snakemake job and run stage `projection` (logic: src/tdabench/pipeline/projection.py).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821  (this checkout's tdabench)
from tdabench.pipeline import common, projection  # noqa: E402

common.run(projection.main, common.JobContext.from_snakemake(snakemake))  # noqa: F821
