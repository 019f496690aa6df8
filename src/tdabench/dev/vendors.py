"""Does `numerics: portable` give the same bits on another CPU vendor? A probe run natively and
under qemu-user's CPU models, which present their vendor (and features) to MKL as a real CPU would.

    python -m tdabench.dev.vendors                     # native, Skylake-Client-v4, EPYC-Rome (+ shim)
    python -m tdabench.dev.vendors --cpus EPYC-Milan   # other models (qemu-x86_64 -cpu help)

Needs `qemu-x86_64` (Debian: apt-get install qemu-user; 7.2 emulates AVX2 and FMA). Emulation is
slow: one probe takes 6-15 minutes, two run at a time. The probe hashes matrix products at the
default model's and SmolLM2's shapes (float32 and float64), vector maths over 100,003 floats and
three AdamW steps of a model of the default size, all under the portable pins; the table lists,
per CPU, MKL's branch and the values that differ from the native run. A dev check, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

SHAPES = [(1024, 64, 128), (128, 1024, 64), (1024, 64, 640), (640, 1024, 64), (37, 64, 128), (256, 576, 1536)]
SHAPES += [(576, 256, 1536), (1536, 256, 576), (256, 1536, 576), (40, 576, 1536), (1536, 40, 576)]


def probe() -> dict[str, str]:
    """{value name: hash} in this process, after the portable pins (call before torch is imported)."""
    import hashlib

    from tdabench import numerics

    numerics.pin_environment("portable", vendor="GenuineIntel")  # the shim comes from the caller
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:12]

    g = torch.Generator().manual_seed(0)
    out = {"mkl_branch": str(numerics.mkl_branch())}
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        out[f"mm {m}x{k}x{n} float32"] = digest(a @ b)
        out[f"mm {m}x{k}x{n} float64"] = digest(a.double() @ b.double())
    x = torch.rand(100003, generator=g) + 0.5
    for fn in ("sqrt", "exp", "log", "rsqrt", "tanh"):
        out[fn] = digest(getattr(torch, fn)(x))
    cfg = LlamaConfig(
        vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(2, 640, (16, 64), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out["3 AdamW steps"] = digest(torch.cat([p.flatten() for p in model.parameters()]))
    return out


def run(cpu: str | None, shim: bool) -> dict[str, str]:
    """The probe natively (cpu None) or under qemu's CPU model `cpu`, the vendor shim preloaded or not."""
    from tdabench import numerics

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LD_PRELOAD": ""}  # qemu itself runs without the shim
    prefix = [] if cpu is None else ["qemu-x86_64", "-cpu", cpu]
    if shim and cpu is None:
        env["LD_PRELOAD"] = str(numerics.mkl_vendor_shim())
    elif shim:
        prefix += ["-E", f"LD_PRELOAD={numerics.mkl_vendor_shim()}"]
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "tdabench.dev.vendors", "--probe"], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"probe on {cpu or 'native'} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdabench.dev.vendors", description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", nargs="+", default=["Skylake-Client-v4", "EPYC-Rome"])
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return
    runs = [(cpu, False) for cpu in args.cpus] + [(cpu, True) for cpu in args.cpus if not cpu.startswith("Skylake")]
    from tdabench import numerics

    native = run(None, numerics.cpu_vendor() != "GenuineIntel")  # the host, as its portable jobs run
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: run(*r), runs))
    print(f"native: MKL branch {native['mkl_branch']}, {len(native) - 1} values")
    print("| CPU | MKL branch | values that differ from the native run |\n|---|---|---|")
    for (cpu, shim), got in zip(runs, results, strict=True):
        differ = [k for k in native if k != "mkl_branch" and got.get(k) != native[k]]
        name = f"{cpu} + vendor shim" if shim else cpu
        print(f"| {name} | {got['mkl_branch']} | {', '.join(differ) or 'none'} |")


if __name__ == "__main__":
    main()
