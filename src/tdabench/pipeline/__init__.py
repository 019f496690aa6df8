"""Stage entry points: one module per workflow stage, called by the thin scripts in workflow/scripts.

Each `main(job)` reads its inputs, calls the library, writes outputs atomically and records the
job's MLflow run (tdabench.tracking). A stage module imports only what its stage needs, so the rule's declared
code inputs (tdabench.codedeps) are exactly the files that can change its results.
"""

import os

# Jobs never wait on a model hub unless the user asks for it (HF_HUB_OFFLINE=0). Set before any
# stage module imports transformers / huggingface_hub, which read it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
