# Thin wrapper: unpack the Snakemake job and run stage `similarity` (logic: src/tdabench/pipeline/similarity.py).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821  (this checkout's tdabench)
from tdabench.pipeline import common, similarity  # noqa: E402

common.run(similarity.main, common.JobContext.from_snakemake(snakemake))  # noqa: F821
