#!/usr/bin/env python
"""Issue 6, "Done when" 4: the llmctl gateway against sequential `generate` and
`transformers serve --continuous-batching`, on the `small` test model, in one run.

    .venv/bin/python bench/serve_compare.py            # all three, print the figures
    .venv/bin/python bench/serve_compare.py --record   # ... and write them to bench/RESULTS.md
    .venv/bin/python bench/serve_compare.py --systems generate,transformers   # no gateway

What runs, one after another so that no two compete for the CPU:

(a) `generate`: the model loaded in this process, greedy `model.generate` on one
    prompt at a time; output tok/s = new tokens / wall time, prefill included.
(b) `llmctl`: `llmctl serve` with a models.yaml on the model (cache off, no limits)
    and a fresh key, measured with the `bench serve` load generator at 1 and 16
    concurrent streams.
(c) `transformers`: `transformers serve --continuous-batching` on the same model
    directory, same load generator, same prompts, same levels.

Every request asks for `--gen-len` (64) new tokens at temperature 0 with prompts
of `--prompt-len` (32) tokens. The checks are the issue's: llmctl at 16 streams ≥ 5x
(a) and above (c) at 16; llmctl at 1 stream ≥ 90% of (a); llmctl TTFT p50 at 16
< 4x its TTFT p50 at 1.

The run repeats (a), (b) and (c) for `--rounds` (3) rounds, the two servers in
alternating order, and judges each check on the median of its per-round values. On
this kind of machine (a small VM) the speed of the same system drifts by 15% or more
over a minute, which is more than the margins being checked: a ratio taken within a
round compares systems measured under the same conditions, and the median keeps one
disturbed round from deciding. Every round's figures are recorded.

The machine is shared, so each measurement also records how much CPU other
processes took meanwhile; above --max-other-cpu (10%) the run is not recorded.
Exit status: 0 every check met, 1 a check missed, 3 disturbed by other processes.
Raw figures go to bench/out/serve_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmctl.benchmarking.serve import ServeBench, ServeConfig, make_prompts  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "RESULTS.md"
START, END = "<!-- serve_compare:start -->", "<!-- serve_compare:end -->"
SYSTEMS = ("generate", "llmctl", "transformers")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        log(f"building the small test model in {path}")
        subprocess.run([str(BIN / "llmctl"), "models", "create-test-model", str(path),
                        "--size", "small"], check=True, stdout=subprocess.DEVNULL)
    return path.resolve()


# --------------------------------------------------------------------------- noise

class CpuWatch:
    """How much CPU other processes took while a system was being measured.

    The machine is shared; a figure measured while something else was computing is
    not a figure of the system. Busy time from /proc/stat minus the time of this
    process and the server under test (with its descendants), as a share of all
    cores over the wall time. Linux only; elsewhere it reports None.
    """

    def __init__(self, *pids: int):
        self.pids = {os.getpid(), *pids}
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy() -> int:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(values) - values[3] - values[4]  # all but idle and iowait

    def _ours(self) -> int:
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                stats[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
        ours, frontier = set(), set(self.pids)
        while frontier:
            ours |= frontier
            frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - ours
        return sum(stats[pid][1] for pid in ours if pid in stats)

    def __enter__(self) -> CpuWatch:
        self.share = None
        try:
            self._start = (time.perf_counter(), self._busy(), self._ours())
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        wall = time.perf_counter() - self._start[0]
        other = (self._busy() - self._start[1]) - (self._ours() - self._start[2])
        self.share = max(0.0, other / self.tick / max(wall, 1e-9) / (os.cpu_count() or 1))


# --------------------------------------------------------------------------- (a)

def run_generate(model_dir: Path, args) -> dict:
    """Sequential greedy `generate`, one prompt at a time, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = make_prompts(args.generate_prompts, args.prompt_len, args.seed, "generate",
                           args.tokenizer)
    encoded = [tokenizer(p, return_tensors="pt") for p in prompts]
    with torch.inference_mode():
        model.generate(**encoded[0], max_new_tokens=4, do_sample=False)  # warm-up
        new_tokens, start = 0, time.perf_counter()
        with CpuWatch() as watch:
            for inputs in encoded:
                out = model.generate(**inputs, max_new_tokens=args.gen_len, do_sample=False)
                new_tokens += out.shape[1] - inputs["input_ids"].shape[1]
        elapsed = time.perf_counter() - start
    return {"requests": len(prompts), "output_tokens": new_tokens, "duration_s": elapsed,
            "output_throughput": new_tokens / elapsed, "other_cpu_share": watch.share,
            "prompt_tokens_mean": sum(e["input_ids"].shape[1] for e in encoded) / len(encoded)}


# --------------------------------------------------------------------------- servers

class Server:
    """A server subprocess with its log in a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], health: str, env: dict, log_dir: Path):
        self.name, self.argv, self.health, self.env = name, argv, health, env
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        log(f"starting {self.name}: {shlex.join(self.argv)}")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not come up:\n{self.log_path.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def load(url: str, model: str, api_key: str | None, args, tag: str, server: Server) -> dict:
    """The `bench serve` load generator at each level, prompts cut to exact token counts."""
    config = ServeConfig(url=url, model=model, api_key=api_key, concurrency=args.levels,
                         prompt_len=args.prompt_len, gen_len=args.gen_len, temperature=0.0,
                         seed=args.seed, min_prompts=args.min_prompts,
                         prompts_per_stream=args.prompts_per_stream, tokenizer=args.tokenizer)
    log(f"{tag}: load at {', '.join(map(str, args.levels))} concurrent streams")
    with CpuWatch(server.proc.pid) as watch:
        result = _run(ServeBench(config))
    result["other_cpu_share"] = watch.share
    return result


def _run(bench: ServeBench) -> dict:
    import asyncio

    return asyncio.run(bench.run())


def run_transformers(model_dir: Path, args, log_dir: Path) -> dict:
    port = free_port()
    argv = [str(BIN / "transformers"), "serve", str(model_dir), "--continuous-batching",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with Server("transformers-serve", argv, f"http://127.0.0.1:{port}/health", env,
                log_dir) as server:
        result = load(f"http://127.0.0.1:{port}", str(model_dir), None, args, "transformers",
                      server)
    result["command"] = shlex.join(["transformers", *argv[1:]])
    return result


def run_llmctl(model_dir: Path, args, log_dir: Path) -> dict:
    home = Path(tempfile.mkdtemp(prefix="llmctl-home-", dir=log_dir))  # fresh each round
    config = log_dir / "models.yaml"
    config.write_text(
        "default_model: small\nmodels:\n"
        f"  - id: llmctl/small-test-model\n    name: small\n    type: local\n"
        f"    path: {model_dir}\n    device: cpu\n    max_batch_size: {max(args.levels)}\n"
        f"    max_queue: {4 * max(args.levels)}\n    max_new_tokens: {args.gen_len}\n")
    port = free_port()
    env = {**os.environ, "LLMCTL_HOME": str(home), "LLMCTL_CACHE_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    llmctl = str(BIN / "llmctl")
    argv = [llmctl, "serve", "--config", str(config), "--port", str(port), "--preload",
            "--log-level", "warning"]
    with Server("llmctl-serve", argv, f"http://127.0.0.1:{port}/healthz", env,
                log_dir) as server:
        created = subprocess.run([llmctl, "keys", "create", "--name", "bench", "--json"],
                                 env=env, capture_output=True, text=True, check=True)
        key = json.loads(created.stdout)["secret"]
        result = load(f"http://127.0.0.1:{port}", "small", key, args, "llmctl", server)
    result["command"] = f"llmctl serve --config models.yaml --preload  # {config.read_text()!r}"
    return result


# --------------------------------------------------------------------------- report

def level(result: dict | None, concurrency: int) -> dict | None:
    if not result:
        return None
    return next((lv for lv in result["levels"] if lv["concurrency"] == concurrency), None)


def checks(gen: dict | None, gw: dict | None, ts: dict | None, hi: int) -> list[dict]:
    """The issue's four conditions in one round (a value is None when a side is missing)."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    gw1, gwn, tsn = level(gw, 1), level(gw, hi), level(ts, hi)
    base = gen["output_throughput"] if gen else None
    out = lambda lv: lv["output_throughput"] if lv else None  # noqa: E731
    ttft = lambda lv: lv["median_ttft_ms"] if lv else None  # noqa: E731
    rows = [
        (f"llmctl @{hi} / generate", ratio(out(gwn), base), ">=", 5.0),
        (f"llmctl @{hi} / transformers serve @{hi}", ratio(out(gwn), out(tsn)), ">", 1.0),
        ("llmctl @1 / generate", ratio(out(gw1), base), ">=", 0.9),
        (f"llmctl TTFT p50 @{hi} / @1", ratio(ttft(gwn), ttft(gw1)), "<", 4.0),
    ]
    return [{"check": name, "value": value, "op": op, "target": target}
            for name, value, op, target in rows]


def verdicts(rounds: list[list[dict]]) -> list[dict]:
    """Each check judged on the median of its per-round values."""
    out = []
    for i, first in enumerate(rounds[0]):
        values = [r[i]["value"] for r in rounds]
        known = [v for v in values if v is not None]
        value = statistics.median(known) if known else None
        op, target = first["op"], first["target"]
        ok = None if value is None else {"<": value < target, ">": value > target,
                                         ">=": value >= target}[op]
        out.append({"check": first["check"], "rounds": values, "value": value,
                    "target": f"{op} {target:g}", "ok": ok})
    return out


def _medians(items: list[dict]) -> dict:
    """The first item with each of its numbers replaced by the median over `items`, and
    the range of output throughput where there is one."""
    out = dict(items[0])
    for key, value in items[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            known = [it[key] for it in items if it.get(key) is not None]
            middle = statistics.median_low if isinstance(value, int) else statistics.median
            out[key] = middle(known) if known else None  # counts stay whole numbers
    if "output_throughput" in out:
        seen = [it["output_throughput"] for it in items]
        out["throughput_range"] = (min(seen), max(seen))
    return out


def median_result(rounds: list[dict]) -> dict:
    """One system's rounds folded into one: medians (per level for a server), and the
    most other-process CPU any round saw."""
    result = _medians(rounds)
    result["other_cpu_share"] = max((r.get("other_cpu_share") or 0) for r in rounds)
    if "levels" in result:
        result["levels"] = [
            _medians([x for r in rounds for x in r["levels"] if x["concurrency"] == c])
            for c in (lv["concurrency"] for lv in rounds[0]["levels"])]
    return result


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def git_commit() -> str:
    """HEAD, and the serving code's uncommitted changes if any (the tree is shared)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, text=True, capture_output=True,
                              check=True).stdout.strip()

    try:
        head = f"`{git('rev-parse', '--short', 'HEAD')}`"
        dirty = [line[3:] for line in git("status", "--porcelain", "server", "llmctl")
                 .splitlines() if line[:2].strip() and not line.startswith("??")]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if dirty:
        head += f" with uncommitted changes to {', '.join(f'`{p}`' for p in dirty[:5])}"
        head += f" and {len(dirty) - 5} more" if len(dirty) > 5 else ""
    return head


def _fmt(value, digits=1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _tput(result: dict) -> str:
    low, high = result.get("throughput_range") or (None, None)
    spread = f" ({_fmt(low)}–{_fmt(high)})" if low is not None and high != low else ""
    return _fmt(result["output_throughput"]) + spread


def _pct(share) -> str:
    return "–" if share is None else f"{share:.0%}"


def markdown(doc: dict) -> str:
    hi = max(doc["args"]["levels"])
    gen, gw, ts = (doc["results"].get(s) for s in SYSTEMS)
    lines = [
        START,
        "## Serving: llmctl gateway vs `transformers serve` vs sequential `generate` "
        "(issue 6, Done when 4)",
        "",
        f"Run {doc['date']} at commit {doc['commit']}: one run of {len(doc['rounds'])} "
        "rounds, systems one after another (the servers in alternating order). "
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
        f"torch {doc['machine']['torch']} ({doc['machine']['torch_threads']} threads), "
        f"transformers {doc['machine']['transformers']}, Python {doc['machine']['python']}. "
        f"Load average before / after: {doc['load_before']} / {doc['load_after']}.",
        "",
        f"Model: `create-test-model --size small` (~35M parameters, Llama, float32, CPU). "
        f"{doc['args']['gen_len']} new tokens a request, greedy (temperature 0), prompts of "
        f"{doc['args']['prompt_len']} tokens (random words); each server level runs "
        f"max({doc['args']['min_prompts']}, {doc['args']['prompts_per_stream']} x concurrency) "
        f"requests, all queued at once and capped at the concurrency (a closed loop: a stream "
        f"sends its next request when the last one ends).",
        "",
        "```",
        doc["command"],
        "```",
        "",
        "Medians over the rounds (output tok/s: median, and the range in brackets):",
        "",
        "| system | streams | output tok/s | TTFT p50 (ms) | TPOT p50 (ms) | E2E p50 (ms) "
        "| requests ok / failed | other processes' CPU (most) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if gen:
        lines.append(f"| sequential `generate` | 1 | {_tput(gen)} | – | – | "
                     f"{_fmt(gen['duration_s'] / gen['requests'] * 1000, 0)} "
                     f"| {gen['requests']} / 0 | {_pct(gen['other_cpu_share'])} |")
    for name, result in (("llmctl gateway", gw), ("`transformers serve --continuous-batching`",
                                                   ts)):
        for lv in (result or {}).get("levels", []):
            lines.append(f"| {name} | {lv['concurrency']} | {_tput(lv)} | "
                         f"{_fmt(lv['median_ttft_ms'], 0)} | {_fmt(lv['median_tpot_ms'], 1)} | "
                         f"{_fmt(lv['median_e2el_ms'], 0)} | {lv['completed']} / "
                         f"{lv['failed']} | {_pct(result['other_cpu_share'])} |")
    n = len(doc["rounds"])
    lines += ["", "| check (issue 6) | " + " | ".join(f"round {i + 1}" for i in range(n))
              + " | median | target | met |", "|---|" + "---:|" * (n + 1) + "---|---|"]
    for c in doc["checks"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[c["ok"]]
        per_round = " | ".join(_fmt(v, 2) for v in c["rounds"])
        lines.append(f"| {c['check']} | {per_round} | {_fmt(c['value'], 2)} | {c['target']} "
                     f"| {met} |")
    missing = [s for s in SYSTEMS if s not in doc["results"]]
    if missing:
        lines += ["", f"Not run in this record: {', '.join(missing)}."]
    lines += ["", "Each check is judged on the median of its per-round values: a ratio within a "
              "round compares systems measured a minute apart, under the same conditions, "
              "while the machine's speed drifts between rounds (see the ranges), so the "
              "medians of the systems' own figures above need not order the same way.",
              "", f"Figures for {hi} streams compare the same load on each server. \"Other "
              "processes' CPU\" is the share of all cores that processes other than the "
              "benchmark and the server under test used while that system was measured (the "
              "machine is shared; the script refuses to record a run above "
              f"{doc['args']['max_other_cpu']:.0%}).", END]
    return "\n".join(lines) + "\n"


def record(text: str) -> None:
    """Replace this script's section of bench/RESULTS.md (others own the rest)."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = current.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)
    log(f"recorded in {RESULTS.relative_to(ROOT)}")


def run_round(model_dir: Path, args, systems: list[str], log_dir: Path, index: int) -> dict:
    """(a), then the two servers, in alternating order from round to round so that a
    drift in the machine's speed does not always favour the same one."""
    out = {}
    if "generate" in systems:
        log("generate: sequential greedy generate")
        out["generate"] = run_generate(model_dir, args)
    servers = [s for s in ("llmctl", "transformers") if s in systems]
    for system in servers if index % 2 == 0 else servers[::-1]:
        run = run_llmctl if system == "llmctl" else run_transformers
        out[system] = run(model_dir, args, log_dir)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "small")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--min-prompts", type=int, default=8,
                        help="requests per level: max(this, --prompts-per-stream x level)")
    parser.add_argument("--prompts-per-stream", type=int, default=4)
    parser.add_argument("--generate-prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every system this many times; checks use the median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "out" /
                        "serve_compare.json")
    parser.add_argument("--record", action="store_true", help="write bench/RESULTS.md")
    parser.add_argument("--max-other-cpu", type=float, default=0.10,
                        help="refuse to record when other processes took more than this "
                        "share of the CPU while a system was measured")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")

    model_dir = ensure_model(args.model_dir)
    from transformers import AutoTokenizer

    args.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    doc = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
           "machine": machine(),
           "args": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items() if k != "tokenizer"},
           "command": shlex.join([".venv/bin/python", "bench/serve_compare.py",
                                  *(argv if argv is not None else sys.argv[1:])]),
           "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "results": {}}
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="serve_compare-") as tmp:
        for r in range(args.rounds):
            log(f"round {r + 1} of {args.rounds}")
            rounds.append(run_round(model_dir, args, systems, Path(tmp), r))
    doc["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    doc["rounds"] = rounds
    results = doc["results"] = {name: median_result([rd[name] for rd in rounds])
                                for name in SYSTEMS if name in rounds[0]}
    doc["checks"] = verdicts([checks(rd.get("generate"), rd.get("llmctl"),
                                     rd.get("transformers"), max(args.levels))
                              for rd in rounds])
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    print(text)
    disturbed = {name: r["other_cpu_share"] for name, r in results.items()
                 if (r.get("other_cpu_share") or 0) > args.max_other_cpu}
    if disturbed:
        log("disturbed: other processes used " + ", ".join(
            f"{share:.0%} of the CPU during {name}" for name, share in disturbed.items())
            + "; not recorded, run again on a quiet machine")
        return 3
    if args.record:
        record(text)
    return 0 if all(c["ok"] is not False for c in doc["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
