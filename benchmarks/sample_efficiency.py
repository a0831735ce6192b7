"""Fixed-n CERTIFY against the anytime-valid modes on the digits engine: accuracy and UNet evaluations.

Runs the CLI (so the numbers are what a user gets) on every 9th digits test image (40 images) at
sigma 0.5, b = 4 steps, K = 3 votes, n0 = 100, alpha = 0.001, seed 0:

- fixed n = 2000 (Cohen et al.'s CERTIFY);
- ``--radius R`` for each target R in (0.25, 0.5, 1, 1.5) x sigma alone, and all four at once;
- ``--tol 0.05`` (stop when the radius would grow by less than 0.05 = 0.1 sigma per doubling);
the sequential modes with ``--n-max 2000``, the fixed run's n, so every mode has the same budget,
and the CLI's defaults otherwise (rounds of one vote, the clear-leader selection rule).
All modes use the exact early exit of the K-run vote (identical votes), and the sequential modes
end the selection phase early (``densepure_rt.stats.sequential.selection_done``: once the samples left
cannot change the argmax, or once the leader is clear); the fixed run's UNet evaluations without
the vote's early exit, i.e. the published method's cost, are (n0 + n) K b per image exactly.

Writes ``benchmarks/results/sample_efficiency/`` (or ``--out``: the TSVs with their options,
``summary.json``, ``summary.md``). Usage: ``python benchmarks/sample_efficiency.py [--engine
engines/digits]``. Takes about 40 minutes on a 2-core CPU (the fixed-n run is most of it).

Before / after the clear-leader rule of the selection (``--selection exact`` runs the sequential
modes with the exact rule alone, by replacing ``selection_done`` with its ``level=0`` form inside
the CLI process; nothing else changes; the committed pair ran at rounds of 32)::

    python benchmarks/sample_efficiency.py --sequential-only --round 32 --selection exact --out benchmarks/results/sample_efficiency/selection_exact
    python benchmarks/sample_efficiency.py --sequential-only --round 32 --selection clear --out benchmarks/results/sample_efficiency/selection_clear
    python benchmarks/sample_efficiency.py --compare benchmarks/results/sample_efficiency/selection_exact benchmarks/results/sample_efficiency/selection_clear

The selection samples each image used are not in the rows: they are recomputed here from the
image's n0 selection votes (drawn once through the API and kept in ``selection_votes.json``) with
the run's rule, and the c_a so found must equal every row's c_a (checked).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sample_efficiency"
SIGMA, STEPS, VOTES, N0, N, ALPHA = 0.5, 4, 3, 100, 2000, 0.001
MULTIPLES = (0.25, 0.5, 1.0, 1.5)
SKIP, SEED, BATCH = 9, 0, 32  # BATCH: the digits engine's default batch
# Everything else is the CLI's default: rounds of one vote (``--round N`` here passes ``--round N``),
# the clear-leader selection rule (``--selection``), the vote's early exit.
COMMON = ["--sigma", SIGMA, "--steps", STEPS, "--votes", VOTES, "--n0", N0, "--alpha", ALPHA, "--skip", SKIP, "--seed", SEED, "--quiet",
          "--batch", BATCH]
# The CLI with the selection rule before the clear-leader rule: selection_done(..., level=0).
EXACT_SELECTION_CLI = (
    "import functools, sys\n"
    "import densepure_rt.stats.sequential as s\n"
    "s.selection_done = functools.partial(s.selection_done, level=0.0)\n"
    "from densepure_rt.cli import main\n"
    "main(prog_name='densepure-rt')\n"
)


def cli(selection: str = "clear-leader") -> list[str]:
    if selection == "exact":
        return [sys.executable, "-c", EXACT_SELECTION_CLI]
    script = Path(sys.executable).with_name("densepure-rt")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "densepure_rt.cli"]


def selection_rule(selection: str):
    """``done(counts0, left)`` of a selection rule: "exact" (the exact rule alone) or a key of
    ``densepure_rt.stats.selection.SELECTION_RULES`` ("clear" is "clear-leader")."""
    from densepure_rt.stats.selection import SELECTION_RULES, selection_done

    if selection == "exact":
        return functools.partial(selection_done, level=0.0)
    return SELECTION_RULES["clear-leader" if selection == "clear" else selection].done


def selection_flags(selection: str) -> list[str]:
    """The CLI's ``--selection`` for a named rule (none for "exact", which patches the CLI instead)."""
    return [] if selection in ("exact", "clear") else ["--selection", selection]


def selection_votes(engine: str, indices: list[int], out: Path) -> dict[int, list[int]]:
    """The voted labels of selection samples 0..n0-1 of each image (the noise of every mode's
    selection phase), drawn once through the API and cached in ``out/selection_votes.json``."""
    from densepure_rt.files.data import digits_test_split
    from densepure_rt.sampling.noise import SELECTION
    from densepure_rt.runtime import open_engine

    path = out / "selection_votes.json"
    votes = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
    todo = [i for i in indices if i not in votes]
    if todo:
        data = digits_test_split()
        with open_engine(ROOT / engine) as eng:
            eng._prepare(SIGMA, STEPS, VOTES, BATCH)
            for i in todo:
                votes[i] = [int(x) for x in eng.loop.voted_labels(data[i].image, SEED, i, SELECTION, range(N0))]
        path.write_text(json.dumps({str(k): votes[k] for k in sorted(votes)}) + "\n")
    return votes


def replay_selection(labels: list[int], rule, round_size: int = 1, num_classes: int = 10) -> tuple[int, int]:
    """(selection samples used, c_a) of the sequential modes' selection (rounds of ``round_size``
    votes) under ``rule``."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for start in range(0, N0, round_size):
        size = min(round_size, N0 - start)
        counts += np.bincount(labels[start : start + size], minlength=num_classes)
        if rule(counts, N0 - start - size):
            return start + size, int(np.argmax(counts))
    raise AssertionError("the rule must stop when no samples are left")


def _cpu() -> dict:
    """The CPU model and the flags that matter for CPU inference speed (docs/design.md section 5)."""
    info = {"machine": platform.machine(), "model": None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        if key.strip() == "flags":
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
            info["flags"] = [f for f in value.split() if f in wanted]
            break
    return info


def _seconds(text: str) -> float:
    """Cohen's time column (str(timedelta), e.g. 0:01:02.5) in seconds."""
    h, m, sec = text.split(":")
    return 3600 * int(h) + 60 * int(m) + float(sec)


def run(name: str, engine: str, extra: list, out_dir: Path = OUT, selection: str = "clear-leader", round_size: int = 1) -> dict:
    out = out_dir / f"{name}.tsv"
    args = cli(selection) + ["certify", "--engine", engine, *map(str, COMMON), *map(str, extra), "--out", str(out.relative_to(ROOT))]
    print(f"$ densepure-rt [selection: {selection}]", " ".join(shlex.quote(a) for a in args[len(cli(selection)) :]), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)  # an existing complete file of the same settings is reused
    lines = out.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    correct = np.array([r["correct"] == "1" for r in rows])
    radius = np.array([float(r["radius"]) for r in rows])
    evals = np.array([int(r["unet_evals"]) for r in rows])
    sequential = "n" in header
    if sequential:  # the selection samples each image used, and a check of every row's c_a
        votes = selection_votes(engine, [int(r["idx"]) for r in rows], out_dir)
        used = []
        for r in rows:
            n_sel, c_a = replay_selection(votes[int(r["idx"])], selection_rule(selection), round_size)
            if c_a != int(r["c_a"]):
                raise SystemExit(f"{out}: image {r['idx']}: c_a {r['c_a']} in the row, {c_a} from the selection votes")
            used.append(n_sel)
        selection_samples = np.array(used)
    else:
        selection_samples = np.full(len(rows), N0)
    samples = selection_samples + np.array([int(r["n"]) if sequential else N for r in rows])
    return {
        "name": name,
        "args": [str(a) for a in extra],
        "images": len(rows),
        "certified_accuracy": {f"{m:g}sigma": float(np.mean(correct & (radius >= m * SIGMA))) for m in MULTIPLES},
        "unet_evals_per_image": float(evals.mean()),
        "unet_evals_median": float(np.median(evals)),
        "images_at_budget": int(sum(int(r.get("n", 0)) == N for r in rows)) if "n" in header else None,
        "selection": selection if sequential else "all n0",
        "round": round_size if sequential else None,
        "selection_samples_per_image": float(selection_samples.mean()),
        "samples_per_image": float(samples.mean()),
        "image_seconds": round(sum(_seconds(r["time"]) for r in rows), 1),
    }


def _accuracy(r: dict) -> str:
    """The certified accuracies of a run, "-" where a single-target run does not answer."""
    only = r["name"][len("radius_"):] if r["name"].startswith("radius_") and r["name"] != "radius_all" else None
    return " | ".join(f"{100 * v:.1f}%" if only in (None, key) else "-" for key, v in r["certified_accuracy"].items())


def compare(before_dir: Path, after_dir: Path) -> None:
    """Before / after table of two runs of the sequential modes (e.g. ``--selection exact`` and
    ``clear``), written to ``OUT/selection_before_after.md`` and ``.json``."""
    before = {r["name"]: r for r in json.loads((before_dir / "summary.json").read_text())["runs"]}
    after = {r["name"]: r for r in json.loads((after_dir / "summary.json").read_text())["runs"]}
    votes = json.loads((after_dir / "selection_votes.json").read_text())
    rules = [json.loads((d / "summary.json").read_text())["settings"]["selection"] for d in (before_dir, after_dir)]
    rounds = [json.loads((d / "summary.json").read_text())["settings"].get("round", BATCH) for d in (before_dir, after_dir)]
    picks = [[replay_selection(v, selection_rule(rule), size) for v in votes.values()] for rule, size in zip(rules, rounds)]
    differ = sum(a[1] != b[1] for a, b in zip(*picks))
    lines = [
        f"Selection before ({rules[0]}) -> after ({rules[1]}): {before_dir.name} -> {after_dir.name}; "
        f"{len(votes)} images, c_a differs on {differ}.",
        "",
        "| mode | " + " | ".join(f"r = {m:g} sigma" for m in MULTIPLES)
        + " | selection samples / image | selection + estimation samples / image | UNet evals / image: mean | (median) | saved (mean) |",
        "|" + " --- |" * (len(MULTIPLES) + 6),
    ]
    rows = []
    for name, b in before.items():
        a = after[name]
        acc_b, acc_a = _accuracy(b).split(" | "), _accuracy(a).split(" | ")
        acc = " | ".join(x if x == y else f"{x} -> {y}" for x, y in zip(acc_b, acc_a))
        saved = 1 - a["unet_evals_per_image"] / b["unet_evals_per_image"]
        lines.append(
            f"| {name} | {acc} | {b['selection_samples_per_image']:.1f} -> {a['selection_samples_per_image']:.1f} | "
            f"{b['samples_per_image']:.0f} -> {a['samples_per_image']:.0f} | "
            f"{b['unet_evals_per_image']:.0f} -> {a['unet_evals_per_image']:.0f} | "
            f"({b['unet_evals_median']:.0f} -> {a['unet_evals_median']:.0f}) | {100 * saved:.0f}% |"
        )
        rows.append({"name": name, "before": b, "after": a, "unet_evals_saved": saved})
    text = "\n".join(lines) + "\n"
    summary = {"before": str(before_dir.relative_to(ROOT)), "after": str(after_dir.relative_to(ROOT)), "images": len(votes),
               "c_a_differs": differ, "runs": rows}
    (OUT / "selection_before_after.json").write_text(json.dumps(summary, indent=2) + "\n")
    (OUT / "selection_before_after.md").write_text(text)
    print(text, end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="engines/digits")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the TSVs and summaries (default %(default)s)")
    parser.add_argument("--selection", choices=("exact", "clear", "clear-leader", "first-1", "first-2", "first-3"), default="clear-leader",
                        help="the sequential modes' selection rule: a --selection of the CLI (clear is clear-leader), or exact, "
                             "the exact rule alone (default %(default)s)")
    parser.add_argument("--round", type=int, default=1, help="the sequential modes' --round (default %(default)s, the CLI's)")
    parser.add_argument("--sequential-only", action="store_true", help="skip the fixed-n run")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="only write OUT/selection_before_after.md/.json from two --out folders of the sequential modes")
    args = parser.parse_args()
    if args.compare:
        compare(*(p.resolve() for p in args.compare))
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    go = functools.partial(run, engine=args.engine, out_dir=out, selection=args.selection, round_size=args.round)
    results = [] if args.sequential_only else [go("fixed_n2000", extra=["--n", N])]
    seq = ["--n-max", N, *(["--round", args.round] if args.round != 1 else []), *selection_flags(args.selection)]
    for m in MULTIPLES:
        results.append(go(f"radius_{m:g}sigma", extra=["--radius", m * SIGMA, *seq]))
    all_targets = [x for m in MULTIPLES for x in ("--radius", m * SIGMA)]
    results.append(go("radius_all", extra=[*all_targets, *seq]))
    results.append(go("tol_0.05", extra=["--tol", 0.05, *seq]))
    full_vote = (N0 + N) * VOTES * STEPS
    summary = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": _cpu(),
        "settings": {"sigma": SIGMA, "steps": STEPS, "votes": VOTES, "n0": N0, "n": N, "alpha": ALPHA, "images": "every 9th digits test image",
                     "selection": args.selection, "round": args.round},
        "fixed_n_unet_evals_without_early_exit": full_vote,
        "runs": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    head = (
        "| mode | " + " | ".join(f"r = {m:g} sigma" for m in MULTIPLES)
        + " | selection + estimation samples / image | UNet evals / image: mean (median) | fewer than fixed n = 2000, full vote: mean (median) |"
    )
    lines = [head, "|" + " --- |" * (len(MULTIPLES) + 4)]
    for r in results:
        # A single-target run answers only for its own radius: other columns are not its question.
        lines.append(
            f"| {r['name']} | {_accuracy(r)} | {r['samples_per_image']:.0f} | {r['unet_evals_per_image']:.0f} ({r['unet_evals_median']:.0f}) | "
            f"{full_vote / r['unet_evals_per_image']:.1f}x ({full_vote / r['unet_evals_median']:.1f}x) |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
