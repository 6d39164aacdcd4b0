"""Probe peftbench's promises as a careless or hostile user would try them, on the surfaces of
issue 24 (weights and caches, values found only while running, choices, the estimator, resources,
data, labels, Ctrl-C, launchers), and count the cases kept, broken and surprising.

    python benchmarks/probe_promises.py            # every case, about 10 minutes on 2 cores
    python benchmarks/probe_promises.py --only choices,data

Each case runs a real command in a fresh temporary folder and holds it to the promise it names:
``refused`` (exit status 2, one line on standard error naming the key, nothing written;
``ranks-refused``: that on every rank torchrun started, torchrun itself then exiting 1),
``failed`` (exit status 1 and a failed record saying why), ``ok`` (exit status 0, the records
expected), ``interrupted`` (Ctrl-C: exit status 130, one line, no traceback, nothing half
written). A case whose promise is kept but whose words are not the expected ones is
``surprising``; one whose promise is broken is ``broken``. The table printed gives each case, its
verdict and what was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RT = str(REPO / "data" / "rt-polarity")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@dataclass
class Case:
    category: str
    name: str
    argv: list[str]  # after "python -m"; {tmp} is the case's folder
    promise: str  # refused | failed | ok | interrupted
    words: str = ""  # what the last line of standard error (or the failed record's error) holds
    setup: Callable[[Path], dict[str, str]] = lambda tmp: {}  # files the case needs; extra environment
    records: int = -1  # ok: how many records (-1: any)


def chat_dangling(tmp: Path) -> dict[str, str]:
    d = tmp / "chat"
    d.mkdir()
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": row["messages"] + [{"role": "user", "content": "And then?"}]}
    (d / "train.jsonl").write_text(json.dumps(bad) + "\n" + json.dumps(row) + "\n")
    (d / "validation.jsonl").write_text(json.dumps(row) + "\n")
    return {}


def alpaca_list(tmp: Path) -> dict[str, str]:
    d = tmp / "alpaca"
    d.mkdir()
    rows = [{"instruction": "Say yes.", "input": "", "output": ["yes", "no"]}]
    (d / "train.json").write_text(json.dumps(rows))
    (d / "validation.json").write_text(json.dumps(rows))
    return {}


def cache_is_a_file(tmp: Path) -> dict[str, str]:
    (tmp / "cache").write_text("")
    return {"PEFTBENCH_CACHE": str(tmp / "cache")}


def huge_json(tmp: Path) -> dict[str, str]:
    (tmp / "runs").mkdir()
    with open(tmp / "runs" / "huge.json", "wb") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MB that a parser would hold about ten times over
    return {}


def missing_weights(tmp: Path) -> dict[str, str]:
    code = (
        "import sys; from safetensors.torch import load_file, save_file; from peftbench import cli, models; "
        "cfg = cli.checked_config('method=full'); m = models.build(cfg.model, 'causal-lm', cfg.task.vocab_size, 0, 2); "
        "m.save_pretrained(sys.argv[1]); f = sys.argv[1] + '/model.safetensors'; t = load_file(f); "
        "save_file({k: v for k, v in t.items() if 'layers.1.' not in k}, f, {'format': 'pt'})"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp / "ckpt")], cwd=REPO, env=ENV, check=True, capture_output=True)
    return {}


SHORT = [
    "train.steps=2",
    "train.batch_size=2",
    "task.num_eval=8",
    "measure.latency_repeats=1",
    "measure.decode_tokens=0",
]
CASES = [
    Case("weights", "checkpoint lacking layer 1", ["peftbench", "method=lora", "model.name_or_path={tmp}/ckpt",
         "results_dir={tmp}/runs", *SHORT], "failed", "the file lacks 9 of the model's",
         missing_weights),
    Case("caches", "PEFTBENCH_CACHE is a file", ["peftbench", "method=lora", "results_dir={tmp}/runs"], "refused",
         "exists and is not a folder", cache_is_a_file),
    Case("values", "prompt longer than task.max_length", ["peftbench", "task=sentiment", "task.max_length=8",
         "results_dir={tmp}/runs"], "refused", "task.max_length=8: the prompt of train example 1 is 47 tokens"),
    Case("values", "text-lm fewer blocks than the batch", ["peftbench", "task=text-lm", f"task.path={RT}",
         "task.max_length=128", "train.batch_size=8", "task.num_train=20", "results_dir={tmp}/runs"], "refused",
         "train.batch_size=8: the train split packs into 3 block(s)"),
    Case("values", "max_new_tokens=100000", ["peftbench", "model=tiny-gpt2", "task=sentiment",
         "task.max_new_tokens=100000", "results_dir={tmp}/runs"], "refused", "must fit the model's 512-token context"),
    Case("choices", "two choices alike", ["peftbench", "task=sentiment", "task.choices=[negative,negative]",
         "results_dir={tmp}/runs"], "refused", "cannot be told apart (tokenize alike"),
    Case("choices", "a choice that begins another", ["peftbench", "task=sentiment",
         "task.choices=[negative,'negative positive']", "results_dir={tmp}/runs"], "refused",
         "'negative' is how 'negative positive' begins"),
    Case("choices", "an unknown word", ["peftbench", "task=sentiment", "task.choices=[negative,zyzzyva]",
         "results_dir={tmp}/runs"], "refused", "'zyzzyva' tokenizes to an unknown token"),
    Case("estimator", "model=minilm", ["peftbench.estimate", "model=minilm", "seq_length=64", "results_dir={tmp}/runs"],
         "ok", records=1),
    Case("estimator", "every preset (glob)", ["peftbench.estimate", "-m", "model=glob(*)", "method=lora",
         "seq_length=128", "results_dir={tmp}/runs"], "ok", records=10),
    Case("estimator", "train.precision=bf16x", ["peftbench.estimate", "train.precision=bf16x",
         "results_dir={tmp}/runs"], "refused", "train.precision=bf16x: allowed:"),
    Case("estimator", "impossible architecture", ["peftbench.estimate", "model=tiny-llama", "seq_length=128",
         "model.arch.hidden_size=1", "results_dir={tmp}/runs"], "refused",
         "transformers refuses this llama architecture"),
    Case("estimator", "100,000 layers", ["peftbench.estimate", "model.arch.num_hidden_layers=100000",
         "results_dir={tmp}/runs"], "refused", "model.arch.num_hidden_layers=100000"),
    Case("resources", "64 ranks on this CPU", ["peftbench", "method=lora", "parallel=ddp", "parallel.nproc=64",
         "train.batch_size=64", "results_dir={tmp}/runs"], "refused", "more CPU ranks than the"),
    Case("resources", "a 200 MB JSON beside records", ["peftbench.report", "--results", "{tmp}/runs", "--out",
         "{tmp}/report"], "ok", "", huge_json),
    Case("data", "a user turn after the response", ["peftbench", "task=instruction", "task.path={tmp}/chat",
         "results_dir={tmp}/runs"], "refused", "after the last assistant message", chat_dangling),
    Case("data", "an Alpaca output that is a list", ["peftbench", "task=instruction", "task.path={tmp}/alpaca",
         "results_dir={tmp}/runs"], "refused", "holds a list, not text", alpaca_list),
    Case("launchers", "torchrun with parallel=none", ["torch.distributed.run", "--nproc-per-node", "2", "-m",
         "peftbench", "method=lora", "results_dir={tmp}/runs"], "ranks-refused",
         "parallel.strategy=none: torchrun started 2 processes"),
    Case("ctrl-c", "a sweep", ["peftbench", "-m", "method=lora,ia3", "train.steps=100000", "task.num_train=64",
         "results_dir={tmp}/runs"], "interrupted", "interrupted (Ctrl-C): 0 of 2 job(s)"),
    Case("ctrl-c", "a DDP job", ["peftbench", "method=lora", "parallel=ddp", "train.steps=100000", "task.num_train=64",
         "train.batch_size=4", "results_dir={tmp}/runs"], "interrupted", "interrupted (Ctrl-C): 0 of 1 job(s)"),
]  # fmt: skip


def run_case(c: Case, tmp: Path) -> tuple[int, str]:
    env = {**ENV, **c.setup(tmp)}
    argv = [a.replace("{tmp}", str(tmp)) for a in c.argv]
    if c.promise != "interrupted":
        done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True)
        return done.returncode, done.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((tmp / "runs").glob(".running-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(10)  # into training (a DDP job's ranks started)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def verdict(c: Case, tmp: Path, code: int, err: str) -> tuple[str, str]:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    recs = []
    for p in (tmp / "runs").glob("*.json") if (tmp / "runs").is_dir() else []:
        try:
            rec = json.loads(p.read_text()) if p.stat().st_size < 2**24 else None
        except ValueError:
            rec = None
        if isinstance(rec, dict) and "run_id" in rec:
            recs.append(rec)
    seen = f"exit {code}; {last[:150]}"
    if c.promise == "refused":
        if code != 2 or recs or "Traceback" in err:
            return "broken", seen
        return ("kept" if c.words in last else "surprising"), seen
    if c.promise == "ranks-refused":  # every rank: the one line and exit status 2; torchrun then exits 1
        said = sum(c.words in line for line in lines)  # torchrun stops the other ranks once one exits
        if recs or "peftbench/" in err.split("Traceback")[-1] or not said or "exitcode  : 2" not in err:
            return "broken", seen + f"; the line on {said} rank(s)"
        return "kept", f"exit {code} (torchrun); the line on {said} rank(s), exit 2"
    if c.promise == "failed":
        failed = [r for r in recs if r.get("status") == "failed"]
        if code != 1 or len(failed) != 1:
            return "broken", seen
        return ("kept" if c.words in str(failed[0].get("error")) else "surprising"), f"exit 1; {failed[0].get('error')}"
    if c.promise == "interrupted":
        if code != 130 or recs or "Traceback" in err or list((tmp / "runs").glob(".running-*")):
            return "broken", seen
        return ("kept" if c.words in last else "surprising"), seen
    ok = code == 0 and (c.records < 0 or len(recs) == c.records) and "Traceback" not in err
    return ("kept" if ok else "broken"), seen + f"; {len(recs)} record(s)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated categories")
    a = p.parse_args()
    chosen = [c for c in CASES if not a.only or c.category in a.only.split(",")]
    counts = {"kept": 0, "broken": 0, "surprising": 0}
    for c in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            code, err = run_case(c, Path(tmp))
            v, seen = verdict(c, Path(tmp), code, err)
        counts[v] += 1
        print(f"{v:10} {c.category:10} {c.name:40} {time.perf_counter() - t0:6.1f} s  {seen}", flush=True)
    print(f"{len(chosen)} cases: {counts['kept']} kept, {counts['broken']} broken, {counts['surprising']} surprising")


if __name__ == "__main__":
    main()
