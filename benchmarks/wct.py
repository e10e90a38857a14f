"""Weak column tuning vs LoRA on the default model (SmolLM2-135M, OWQ-3, k = 8), two Austen tasks.

(a) domain: `{"text"}` windows from the five training novels -> perplexity on Persuasion;
(b) novel identification: passage + question -> title, accuracy of ranking the six titles by
log-likelihood on held-out passages (chance 1/6). Every method trains through the same loop
(`owq.quantizer.tune.train`) on the same batches for the same number of steps, so steps and tokens
are equal; only the trainable parameters (and the learning rate) differ:

  float      the float model, untuned           owq        the OWQ base, untuned
  wct        weak columns of the OWQ base       lora-float LoRA (rank matched to WCT) on float
  lora-owq   the same LoRA on the OWQ base (peft wrapping our OWQLinear)

Each (task, method) runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

METHODS = ("float", "owq", "wct", "lora-float", "lora-owq")
TASKS = ("domain", "novel-id")
EXAMPLE_NAMES = {"domain": "austen-domain", "novel-id": "austen-novel-id"}

EXAMPLES = """examples:
  python benchmarks/wct.py --threads 1                      # full run (~20-30 min, 2 busy cores)
  python benchmarks/wct.py --steps 120 --train-per-novel 160 --test-per-novel 25  # quality run
  python benchmarks/wct.py --steps 4 --ppl-windows 2 --test-per-novel 2     # smoke run
  python benchmarks/wct.py --tasks novel-id --methods owq wct lora-float
  python benchmarks/wct.py --examples-dir examples/adapters  # also keep the two WCT adapters
"""


@dataclass(frozen=True)
class Settings:
    base: str  # owq checkpoint dir ('default' = the cached OWQ-3 k=8 default checkpoint)
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    steps: int
    batch_size: int
    grad_accum: int
    wct_lr: float
    lora_lr: float
    seed: int
    domain_train: int
    domain_eval: int
    domain_words: int
    ppl_windows: int
    seqlen: int
    train_per_novel: int
    test_per_novel: int
    threads: int
    work_dir: str


def parse_args(argv=None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", default="default", help="owq checkpoint (default: OWQ-3 k=8)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per training run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--wct-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain-train", type=int, default=320, help="(a) training windows")
    p.add_argument("--domain-eval", type=int, default=16, help="(a) held-out windows, 5 novels")
    p.add_argument("--domain-words", type=int, default=96, help="(a) words per window")
    p.add_argument("--ppl-windows", type=int, default=8, help="(a) Persuasion windows scored")
    p.add_argument("--seqlen", type=int, default=512, help="(a) perplexity window length")
    p.add_argument("--train-per-novel", type=int, default=60, help="(b) training passages")
    p.add_argument("--test-per-novel", type=int, default=10, help="(b) held-out passages")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = default)")
    p.add_argument("--work-dir", default="benchmarks/results/wct-work")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/wct.json"))
    p.add_argument("--examples-dir", type=Path, default=None, help="copy the WCT adapters here")
    args = p.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    fields |= {"tasks": tuple(args.tasks), "methods": tuple(args.methods)}
    return Settings(**fields), args


# data ----------------------------------------------------------------------------------------
def write_data(s: Settings) -> dict[str, str]:
    from wct_tasks import domain_task, novel_id_task

    from owq.quantizer.tuning.data import write_jsonl

    work = Path(s.work_dir) / "data"
    train, held = domain_task(s.seed, s.domain_train, s.domain_eval, s.domain_words)
    id_train, id_test = novel_id_task(s.seed, s.train_per_novel, s.test_per_novel)
    files = {
        "domain-train": write_jsonl(train, work / "domain_train.jsonl"),
        "domain-eval": write_jsonl(held, work / "domain_eval.jsonl"),
        "novel-id-train": write_jsonl(
            [i.record() for i in id_train], work / "novel_id_train.jsonl"
        ),
        "novel-id-eval": write_jsonl([i.record() for i in id_test], work / "novel_id_test.jsonl"),
    }
    return {k: str(v) for k, v in files.items()}


# one run (in a child process) ---------------------------------------------------------------
def _load(method: str, base: str):
    import torch
    from transformers import AutoTokenizer

    if method in ("float", "lora-float"):
        from owq.builtin.model import load_float_model

        model, tokenizer = load_float_model("default")
        return model.to(torch.float32), tokenizer
    from owq.kernels.checkpoint import load_checkpoint

    return load_checkpoint(base), AutoTokenizer.from_pretrained(base)


def _metric(task: str, model, tokenizer, s: Settings, eval_file: str) -> float:
    import torch

    if task == "domain":
        from owq.builtin.corpus import heldout_text
        from owq.quantizer.perplexity import perplexity

        ids = torch.tensor(tokenizer(heldout_text()).input_ids)
        return perplexity(model, ids, s.seqlen, s.ppl_windows, progress=False).ppl
    from wct_tasks import TITLES, NovelItem, title_accuracy

    by_title = {" " + title: name for name, title in TITLES.items()}
    lines = Path(eval_file).read_text().splitlines()
    items = [NovelItem(r["prompt"], by_title[r["completion"]]) for r in map(json.loads, lines)]
    return title_accuracy(model, tokenizer, items)


def _train(method: str, model, tokenizer, s: Settings, files: dict, task: str, out: Path) -> dict:
    """Train in place; returns trainable params, adapter bytes and the TrainResult summary."""
    from wct_lora import rank_for_budget, save_lora, trainable, wrap_lora

    from owq.kernels.adapters import save_adapter
    from owq.quantizer.tuning.data import load_examples, pad_id_of
    from owq.quantizer.tuning.tune import TuneConfig, make_adapter, train, tune_weak_columns

    lr = s.wct_lr if method == "wct" else s.lora_lr
    cfg = TuneConfig(
        max_steps=s.steps, lr=lr, batch_size=s.batch_size, grad_accum=s.grad_accum, seed=s.seed
    )
    examples = load_examples(files[f"{task}-train"], tokenizer, cfg.max_len)
    held = load_examples(files[f"{task}-eval"], tokenizer, cfg.max_len)
    pad = pad_id_of(tokenizer)
    if method == "wct":
        layers, result = tune_weak_columns(model, examples, cfg, held, pad, progress=False)
        adapter = make_adapter(model, layers, EXAMPLE_NAMES[task], cfg, result, data=task)
        save_adapter(adapter, out, overwrite=True)
        params = adapter.config["trainable_params"]
        ks = sorted({t.shape[0] for t in adapter.columns.values()})
        k = str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"  # uneven k: its range
        info = {"adapter_bytes": _dir_bytes(out), "rank_or_k": f"k={k}"}
        return {"trainable_params": params, **info, "train": result.summary()}
    rank = rank_for_budget(model, _wct_budget(s.base))
    peft_model = wrap_lora(model, rank, seed=s.seed)
    params = trainable(peft_model)
    result = train(peft_model, params, examples, cfg, held, pad, progress=False)
    info = {"adapter_bytes": save_lora(peft_model, out), "rank_or_k": f"r={rank}"}
    return {"trainable_params": sum(p.numel() for p in params), **info, "train": result.summary()}


def _wct_budget(base: str) -> int:
    """Trainable parameters of WCT on all layers of the base: Σ k·out."""
    from safetensors import safe_open

    with safe_open(str(Path(base) / "model.safetensors"), "pt") as f:
        return sum(
            f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
            for k in f.keys()
            if k.endswith(".oweight")
        )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_job(task: str, method: str, s: Settings, files: dict) -> dict:
    import torch

    from owq.quantizer.tuning.memory import current_rss_bytes, peak_rss_bytes

    if s.threads:
        torch.set_num_threads(s.threads)
    start = time.perf_counter()
    model, tokenizer = _load(method, s.base)
    row = {"task": task, "method": method, "rss_after_load": current_rss_bytes()}
    if method in ("wct", "lora-float", "lora-owq"):
        out = Path(s.work_dir) / "adapters" / f"{task}-{method}"
        row |= _train(method, model, tokenizer, s, files, task, out)
    model.eval()
    with torch.no_grad():
        metric_start = time.perf_counter()
        row["metric"] = _metric(task, model, tokenizer, s, files[f"{task}-eval"])
        row["metric_seconds"] = time.perf_counter() - metric_start
    return row | {"peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - start}


def run_isolated(task: str, method: str, s: Settings, files: dict) -> dict:
    """`run_job` in a fresh spawned process (clean peak RSS, no state shared between runs)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_job, task, method, s, files).result()


# report --------------------------------------------------------------------------------------
def format_table(rows: list[dict], base_bytes: int) -> str:
    mib = 2**20
    head = (
        f"{'task':<9} {'method':<10} {'metric':>9} {'params':>9} {'lora r/k':>8} {'steps':>5} "
        f"{'tokens':>7} {'train s':>7} {'adapter KiB':>11} {'% base':>6} {'peak MiB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r.get("train", {})
        size = r.get("adapter_bytes")
        metric = f"ppl {r['metric']:.2f}" if r["task"] == "domain" else f"acc {r['metric']:.3f}"
        lines.append(
            f"{r['task']:<9} {r['method']:<10} {metric:>9} {r.get('trainable_params', 0):>9} "
            f"{r.get('rank_or_k', '-'):>8} {t.get('steps', 0):>5} {t.get('input_tokens', 0):>7} "
            f"{t.get('seconds', 0):>7.0f} {(size or 0) / 1024:>11.0f} "
            f"{(100 * size / base_bytes if size else 0):>6.2f} {r['peak_rss'] / mib:>8.0f}"
        )
    return "\n".join(lines)


def floors(rows: list[dict], base_bytes: int) -> dict:
    """The issue's acceptance floors, each True/False (None if a needed run is missing)."""
    get = {(r["task"], r["method"]): r for r in rows}

    def metric(task, method):
        return get[(task, method)]["metric"] if (task, method) in get else None

    wct_a, owq_a = metric("domain", "wct"), metric("domain", "owq")
    wct_b, lora_b = metric("novel-id", "wct"), metric("novel-id", "lora-float")
    sizes = [r["adapter_bytes"] for r in rows if r["method"] == "wct"]
    return {
        "wct_lowers_domain_ppl": None if None in (wct_a, owq_a) else wct_a < owq_a,
        "wct_novel_id_3x_chance": None if wct_b is None else wct_b >= 3 / 6,
        "wct_novel_id_0.9x_lora_float": None if None in (wct_b, lora_b) else wct_b >= 0.9 * lora_b,
        "wct_adapter_le_3pct_base": None if not sizes else max(sizes) <= 0.03 * base_bytes,
    }


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s, args = parse_args(argv)
    if s.base == "default":
        from owq.default_checkpoint import default_checkpoint

        s = Settings(**(asdict(s) | {"base": str(default_checkpoint())}))
    files = write_data(s)
    base_bytes = (Path(s.base) / "model.safetensors").stat().st_size
    rows = []
    for task in s.tasks:
        for method in s.methods:
            logging.info("running %s / %s", task, method)
            rows.append(run_isolated(task, method, s, files))
            print(format_table(rows[-1:], base_bytes).splitlines()[-1], flush=True)
    print(format_table(rows, base_bytes))
    result = {"settings": asdict(s), "base_bytes": base_bytes, "rows": rows}
    result["floors"] = floors(rows, base_bytes)
    print(json.dumps(result["floors"], indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.examples_dir:
        for task in s.tasks:
            src = Path(s.work_dir) / "adapters" / f"{task}-wct"
            if src.is_dir():
                dst = args.examples_dir / EXAMPLE_NAMES[task]
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
