"""CPU benchmark: the same certification work with the PyTorch reference (eager) and the runtime
(ONNX Runtime, fp32), in one run on one machine; checks that they agree and prints the ratio.

Both paths get the same noise (``densepure_rt.sampling.noise``), so their vote counts must be identical.

    python benchmarks/cpu_bench.py --preset cifar10 --random-weights --images 2 --out benchmarks/results/cpu_cifar10.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from harness import add_out, command, machine, parser, utc_now, write_record


def _images(preset, count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    if preset.name == "digits":
        from densepure_rt.files.data import digits_test_split

        data = digits_test_split()
        return np.stack([data[i].image for i in range(count)]), [data[i].label for i in range(count)]
    rng = np.random.default_rng(seed)
    shape = (count, preset.channels, preset.image_size, preset.image_size)
    return rng.random(shape, dtype=np.float32), [-1] * count


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="cifar10", help="imagenet, cifar10, digits or tiny")
    ap.add_argument("--random-weights", action="store_true", help="random weights (required for imagenet/cifar10 here)")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--steps", default="2")
    ap.add_argument("--votes", type=int, default=2)
    ap.add_argument("--n0", type=int, default=4)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    add_out(ap, "write the JSON record here", metavar="FILE", required=False)
    args = ap.parse_args(argv)

    import onnxruntime
    import torch

    from densepure_rt.engine.build import BuildOptions, build_engine
    from densepure_rt.export.models import load_classifier, load_unet
    from densepure_rt.export.reference import DensePureReference
    from densepure_rt.sampling.noise import ESTIMATION, SELECTION
    from densepure_rt.presets import get_preset
    from densepure_rt.runtime import open_engine
    from densepure_rt.schedule import make_schedule, reverse_schedule

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    unet = load_unet(preset, random_weights=args.random_weights, seed=args.seed)
    classifier = load_classifier(preset, random_weights=args.random_weights, seed=args.seed)
    schedule = make_schedule(preset.schedule, preset.num_timesteps, preset.rescale_timesteps)
    rs = reverse_schedule(schedule, args.sigma, args.steps)
    reference = DensePureReference(unet, classifier, schedule, preset.num_classes)
    images, labels = _images(preset, args.images, args.seed)
    record: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_engine(Path(tmp) / "engine", preset, unet, classifier, BuildOptions(precision="fp32", batch=args.batch), log=lambda m: None)
        record["build_seconds"] = time.perf_counter() - t0
        # All K runs of every sample, as the reference does: the same work on both sides (the vote's
        # early exit would give the same counts with fewer UNet calls; that is measured elsewhere).
        with open_engine(Path(tmp) / "engine", threads=args.threads, early_exit=False) as engine:
            common = dict(seed=args.seed, batch=args.batch)
            # Warm up both paths (first-call allocation, ORT graph optimisation, oneDNN primitive caches).
            engine.certify_counts(images[0], args.sigma, args.steps, args.votes, args.batch, args.batch, args.alpha,
                                  seed=99, image_index=0, batch=args.batch)
            reference.sample_counts(images[0], args.batch, rs, args.votes, 99, 0, SELECTION, args.batch)
            times = {"reference": 0.0, "runtime": 0.0}
            agree = True
            per_image = []
            for index, image in enumerate(images):
                counts = {}
                for name in ("reference", "runtime"):
                    start = time.perf_counter()
                    if name == "reference":
                        c0 = reference.sample_counts(image, args.n0, rs, args.votes, args.seed, index, SELECTION, args.batch)
                        c1 = reference.sample_counts(image, args.n, rs, args.votes, args.seed, index, ESTIMATION, args.batch)
                    else:
                        _, got = engine.certify_counts(image, args.sigma, args.steps, args.votes, args.n0, args.n, args.alpha,
                                                       image_index=index, **common)
                        c0, c1 = got.counts0, got.counts
                    times[name] += time.perf_counter() - start
                    counts[name] = (c0, c1)
                same = all(np.array_equal(a, b) for a, b in zip(counts["reference"], counts["runtime"]))
                agree &= same
                per_image.append({"index": index, "label": labels[index], "counts_equal": bool(same),
                                  "top_counts": counts["runtime"][1].argsort()[::-1][:3].tolist()})

    noisy = args.images * (args.n0 + args.n)
    unet_evals = noisy * args.votes * rs.num_calls
    env = machine()
    record.update(
        {
            "benchmark": "cpu_reference_vs_runtime",
            "preset": preset.name,
            "random_weights": args.random_weights,
            "device": env["cpu"]["model"],
            "threads": args.threads,
            "versions": {
                "python": env["python"],
                "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__,
                "numpy": np.__version__,
            },
            "command": command(argv),
            "date": utc_now(),
            "noisy_samples": noisy,
            "unet_evals": unet_evals,
            "seconds": times,
            "noisy_samples_per_s": {k: noisy / v for k, v in times.items()},
            "unet_evals_per_s": {k: unet_evals / v for k, v in times.items()},
            "runtime_speedup_over_reference": times["reference"] / times["runtime"],
            "counts_identical": bool(agree),
            "images": per_image,
        }
    )
    print(
        f"{preset.name}: {noisy} noisy samples x {args.votes} runs x {rs.num_calls} steps on {args.threads} threads\n"
        f"  reference (torch eager) {times['reference']:.2f} s   runtime (onnxruntime fp32) {times['runtime']:.2f} s\n"
        f"  runtime / reference throughput: {record['runtime_speedup_over_reference']:.2f}x   "
        f"vote counts identical: {agree}"
    )
    if args.out:
        write_record(args.out.parent, args.out.stem, record)
    if not agree:
        raise SystemExit("the runtime and the reference disagree")
    return record


if __name__ == "__main__":
    main()
