import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests run the kernels a job pins under `numerics: portable` (exported before torch is
# imported), so a bit-for-bit comparison in a test holds on any x86 CPU kind, as the jobs' numbers
# do: unpinned, MKL's AVX-512 kernels round a float64 product by its row count.
from tdabench import numerics  # noqa: E402  (does not import torch)

if "avx2" in numerics.cpu_flags():
    os.environ.update(numerics.CPU_PINS)


def pytest_report_header(config):
    # On a CPU not Intel's, MKL runs its AVX2 branch only with the vendor shim preloaded, which
    # must happen before Python starts: `make test` does it (tdabench.numerics.preload).
    if numerics.needs_vendor_shim() and "avx2" in numerics.cpu_flags() and not numerics.shim_loaded():
        return (
            "numerics: MKL's vendor shim is not preloaded: in-process products run MKL's AUTO branch (run `make test`)"
        )
    return None


# `make test` runs two pytest-xdist workers, each test file on one (--dist loadfile, in collection
# order): the longest files go first so that neither worker is left with one at the end.
LONGEST_FIRST = (
    "test_cluster.py",  # make test-long
    "test_reproducibility.py",  # make test-long
    "test_workflow.py",
    "test_userdata.py",
    "test_published.py",
    "test_architectures.py",
    "test_streaming.py",
    "test_numerics.py",
    "test_tracking.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file
