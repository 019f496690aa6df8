# Thin wrapper: unpack the Snakemake job and run stage `background` (logic: src/tdabench/pipeline/dataset.py).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # noqa: F821  (this checkout's tdabench)
from tdabench.pipeline import common, dataset  # noqa: E402

common.run(dataset.main_background, common.JobContext.from_snakemake(snakemake))  # noqa: F821
