# Thin wrapper: unpack the Snakemake job and run stage `generate` (logic: src/tdabench/pipeline/generate.py).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821  (this checkout's tdabench)
from tdabench.pipeline import common, generate  # noqa: E402

common.run(generate.main, common.JobContext.from_snakemake(snakemake))  # noqa: F821
