"""Bytes of a packed supernet file (every sub-net's codes, shared tensors once) against one sub-net's
packed file, the sum of separate sub-net files, and the trainable supernet's latent weights; and a
check that every sub-net loaded from the file equals the extracted sub-net compiled alone.

    python benchmarks/serve/supernet_file_sizes.py runs/serve/lenet5x2.supernet \
        --out-file runs/serve/lenet5x2-codes.supernet

Reads a trainable (version 1) supernet file, writes it as a packed (version 2) file and writes
``benchmarks/results/serve_supernet_file.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lowbit.export.supernet_file import load_supernet_file, save_supernet_file
from lowbit.nn.supernet import Supernet
from lowbit.runtime import compile as compile_packed
from lowbit.serve import load_supernet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trainable", help="a version-1 (latent weights) supernet file")
    p.add_argument("--out-file", required=True, help="the packed supernet file to write")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="serve_supernet_file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    sn = load_supernet(a.trainable)
    if not isinstance(sn, Supernet):
        raise SystemExit(f"{a.trainable} is already a packed supernet file; give the trainable one")
    sizes = save_supernet_file(sn, a.out_file)
    loaded = load_supernet_file(a.out_file)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, *sn.input_shape), generator=g)
    equal = {}
    for n in sn.names:
        try:
            ref = compile_packed(sn.extract(n), x)(x)
            got = compile_packed(loaded.models[n], x)(x)
        except ValueError:  # a float sub-net: compare in PyTorch
            with torch.inference_mode():
                ref, got = sn.run(x, n), loaded.run(x, n)
        equal[n] = bool(torch.equal(ref, got))
    payload = {**run_meta(__file__, argv, t0, seeds=[0]), "source": a.trainable, "file": a.out_file,
               "sizes": sizes, "subnets": sn.names, "bit_equal": equal}
    s = sizes
    md = "\n".join([
        "# One packed file holds the whole supernet", "",
        f"`{payload['command']}`; torch {payload['torch']}.", "",
        f"Supernet {a.trainable} ({len(sn.names)} sub-nets) written as packed codes to {a.out_file}.", "",
        "| what | bytes |", "|---|---|",
        f"| the packed supernet file (every sub-net, distinct tensors once) | {s['file_bytes']:,} |",
        f"| its tensors | {s['stored_tensor_bytes']:,} |",
        f"| each sub-net as a separate packed file, summed | {s['subnet_tensor_bytes']:,} |",
        f"| the largest sub-net's packed file alone | {s['largest_subnet_bytes']:,} |",
        f"| the trainable supernet's tensors (latent float weights, every BatchNorm, quantizers) | "
        f"{s['latent_bytes']:,} |", "",
        "Every sub-net loaded from the file and compiled by `lowbit.runtime.compile` equals the sub-net "
        "extracted from the trainable supernet and compiled alone, bit for bit, on 4 seeded inputs: "
        + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in equal.items()) + ".",
    ]) + "\n"
    write_results(a.out, a.stem, payload, md)
    return 0 if all(equal.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
