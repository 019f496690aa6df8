"""numerics: portable pins the CPU kernels and pads batches so a training step gives the same bits
at any thread count; native does neither; a CPU that cannot run the pins is refused in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gradients import max_rel_error, reference

from tdabench import numerics
from tdabench.config import ConfigError, validate_config
from tdabench.gradients import per_sample_gradients
from tdabench.models import Encoded, collate

from helpers import VOCAB, tiny_llama

HAS_AVX2 = "avx2" in numerics.cpu_flags()


def test_unknown_mode_is_refused_by_the_schema_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"numerics.*'fast'.*portable.*native"):
        validate_config({"numerics": "fast"})
    assert validate_config({})["numerics"] == "portable"


@pytest.mark.parametrize(
    ("flags", "machine", "lacks"),
    [({"sse4_2", "avx"}, "x86_64", "a CPU without AVX2"), (set(), "aarch64", "a aarch64 CPU")],
)
def test_portable_without_avx2_is_one_line_naming_what_is_missing_and_native(flags, machine, lacks):
    with pytest.raises(numerics.NumericsError) as err:
        numerics.check_host("portable", flags=flags, machine=machine)
    message = str(err.value)
    assert "\n" not in message and lacks in message and "numerics=native" in message
    numerics.check_host("native", flags=flags, machine=machine)  # native runs anywhere
    numerics.check_host("portable", flags={"avx2"}, machine="x86_64")


def test_portable_exports_the_pins_and_native_exports_nothing():
    env = {}
    with numerics.active("native"):  # pin_environment sets this process's mode; restored after
        if HAS_AVX2:
            assert numerics.pin_environment("portable", env) == env
            assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_CBWR"].startswith("AVX2")
            assert numerics.token_multiple() == numerics.PAD_MULTIPLE
        env.clear()
        assert numerics.pin_environment("native", env) == {} and env == {}
        assert numerics.token_multiple() == 1


def _capability(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


@pytest.mark.slow  # fresh processes
@pytest.mark.skipif(not HAS_AVX2, reason="portable needs an AVX2 CPU")
def test_pins_override_a_kernel_level_forced_in_the_environment_and_a_late_pin_is_caught():
    pinned = (
        "from tdabench import numerics; numerics.pin_environment('portable'); import torch; "
        "numerics.configure_torch('portable'); print(torch.backends.cpu.get_cpu_capability())"
    )
    result = _capability(pinned, {"ATEN_CPU_CAPABILITY": "default"})
    assert result.returncode == 0 and result.stdout.strip() == "AVX2", result.stderr
    late = (
        "import torch; torch.ones(3).sum(); from tdabench import numerics; "
        "numerics.pin_environment('portable'); numerics.configure_torch('portable')"
    )
    result = _capability(late, {"ATEN_CPU_CAPABILITY": "default"})
    assert result.returncode != 0 and "torch was imported before" in result.stderr


def test_on_a_cpu_not_intels_portable_preloads_a_built_shim_that_answers_mkls_vendor_check_yes(tmp_path, monkeypatch):
    import ctypes

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh build, not a cached one
    with numerics.active("native"):
        env = {"LD_PRELOAD": "/opt/other.so"}
        pins = numerics.pin_environment("portable", env, vendor="AuthenticAMD")
        shim, other = pins["LD_PRELOAD"].split(":")
        assert Path(shim).parent == tmp_path / "tdabench" and other == "/opt/other.so"
        assert ctypes.CDLL(shim).mkl_serv_intel_cpu_true() == 1
        assert numerics.pin_environment("portable", env, vendor="AuthenticAMD")["LD_PRELOAD"] == pins["LD_PRELOAD"]
        assert numerics.restart_needed(env)  # this process started without it
        assert not numerics.shim_loaded()
        intel = {}
        assert "LD_PRELOAD" not in numerics.pin_environment("portable", intel, vendor="GenuineIntel")
        assert not numerics.restart_needed(intel)
    assert numerics.preload("GenuineIntel") == os.environ.get("LD_PRELOAD", "")
    assert numerics.preload("AuthenticAMD").startswith(shim)


@pytest.mark.slow  # fresh processes
@pytest.mark.skipif(not HAS_AVX2, reason="portable needs an AVX2 CPU")
def test_a_process_restarted_with_the_shim_runs_mkls_avx2_branch_with_the_same_products(tmp_path):
    # What stage.py does, with the vendor named: on a CPU not Intel's the job restarts once, and then
    # MKL's vendor check answers yes and MKL runs its AVX2 branch.
    code = (
        "import ctypes, hashlib, os, sys; from tdabench import numerics; "
        "numerics.pin_environment('portable', vendor=sys.argv[1]); numerics.restart_for_shim(); "
        "import torch; numerics.configure_torch('portable'); g = torch.Generator().manual_seed(0); "
        "a, b = torch.randn(576, 256, generator=g), torch.randn(256, 1536, generator=g); "
        "shim = hasattr(ctypes.CDLL(None), 'mkl_serv_intel_cpu_true'); "
        "print(numerics.mkl_branch(), shim, hashlib.sha256((a @ b).numpy().tobytes()).hexdigest())"
    )
    env = {"XDG_CACHE_HOME": str(tmp_path), "LD_PRELOAD": ""}
    runs = {vendor: _capability_args(code, vendor, env) for vendor in ("AuthenticAMD", "GenuineIntel")}
    for result in runs.values():
        assert result.returncode == 0, result.stderr
    shimmed, plain = (runs[v].stdout.split() for v in ("AuthenticAMD", "GenuineIntel"))
    assert shimmed[:2] == [str(numerics.MKL_BRANCH), "True"] and plain[1] == "False"
    if numerics.cpu_vendor() == "GenuineIntel":
        assert shimmed[2] == plain[2]  # on Intel's CPU the shim changes nothing


def test_a_process_restarted_once_and_still_without_the_shim_is_refused_not_restarted_again(monkeypatch):
    with numerics.active("native"):
        monkeypatch.setenv("LD_PRELOAD", str(numerics.mkl_vendor_shim()))  # named, not loaded here
        monkeypatch.setenv(numerics.RESTARTED, "1")
        with pytest.raises(numerics.NumericsError, match=r"did not preload MKL's vendor shim.*numerics: native"):
            numerics.restart_for_shim()
        monkeypatch.delenv("LD_PRELOAD")
        numerics.restart_for_shim()  # no shim named: nothing to do


@pytest.mark.slow  # a fresh process
@pytest.mark.skipif(not HAS_AVX2, reason="portable needs an AVX2 CPU")
def test_a_job_where_mkl_runs_another_branch_is_refused_naming_the_branch():
    # MKL_CBWR changed after the pins stands in for a CPU where MKL ignores them (AUTO, on AMD's).
    code = (
        "import os; from tdabench import numerics; numerics.pin_environment('portable'); "
        "os.environ['MKL_CBWR'] = 'COMPATIBLE'; import torch; numerics.configure_torch('portable')"
    )
    result = _capability(code, {})
    assert result.returncode != 0
    assert "needs MKL's AVX2 branch, but MKL runs its COMPATIBLE branch" in result.stderr


def _capability_args(code: str, arg: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, arg], env={**os.environ, **env}, capture_output=True, text=True)


def _examples(lengths: list[int]) -> list[Encoded]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(Encoded(ids, [-100] * (n // 2) + ids[n // 2 :], n // 2, False))
    return out


def test_portable_pads_batches_to_the_token_multiple_and_gradients_stay_exact():
    model = tiny_llama()
    examples = _examples([9, 5, 13, 7])
    with numerics.active("native"):
        assert collate(examples, 0)["input_ids"].shape == (4, 13)
    with numerics.active("portable"):
        batch = collate(examples, 0)
    assert batch["input_ids"].shape == (4, 16) and int(batch["attention_mask"].sum()) == 34
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")] + ["lm_head.weight"]
    got = per_sample_gradients(model, batch["input_ids"], batch["attention_mask"], batch["labels"], names)
    want = reference(model, batch["input_ids"], batch["attention_mask"], batch["labels"], names)
    assert max_rel_error(got, want) < 1e-5


STEP = """
import hashlib, sys
from tdabench import numerics
numerics.pin_environment(sys.argv[1])  # before torch, as a job does
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from tdabench.config import validate_config
from tdabench.models import Encoded, collate
from tdabench.train import lm_loss

tiny = validate_config({})["model"]["tiny"]
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=tiny["vocab_size"], hidden_size=tiny["hidden_size"], intermediate_size=tiny["intermediate_size"],
    num_hidden_layers=tiny["num_layers"], num_attention_heads=tiny["num_heads"], attn_implementation="eager"))
g = torch.Generator().manual_seed(3)
examples = []
for n in [37, 29, 38, 21] * 8:  # no length a multiple of 8
    ids = torch.randint(1, tiny["vocab_size"], (n,), generator=g).tolist()
    examples.append(Encoded(ids, [-100] * (n // 2) + ids[n // 2 :], n // 2, False))
batch = collate(examples, 0)
for threads in (1, 2):  # one step at each thread count, in this process
    torch.set_num_threads(threads)
    model.zero_grad()
    lm_loss(model, batch).backward()
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.grad.numpy().tobytes())
    print(digest.hexdigest())
"""


def _step_digests(mode: str) -> list[str]:
    """Digests of the parameter gradients of one training step of the default-size tiny model at
    1 and at 2 threads, in a fresh process that pins `mode` as a job does."""
    unpinned = {k: v for k, v in os.environ.items() if k not in numerics.CPU_PINS}  # (conftest pins the tests)
    result = subprocess.run([sys.executable, "-c", STEP, mode], env=unpinned, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.skipif(not HAS_AVX2, reason="portable needs an AVX2 CPU")
@pytest.mark.slow
def test_portable_training_step_is_thread_count_independent():
    one, two = _step_digests("portable")
    assert one == two
    # The reason for the padding: unpadded (native), the same step rounds differently at 2 threads.
    one, two = _step_digests("native")
    assert one != two, (
        "torch's CPU softmax backward no longer depends on the thread count: portable's padding may be dropped"
    )
