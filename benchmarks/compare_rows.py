"""Compare the results files of a fresh run with recorded ones, row by row, ignoring wall time.

    python benchmarks/compare_rows.py NEW_FOLDER RECORDED_FOLDER

Every ``*.tsv`` results file of RECORDED_FOLDER that NEW_FOLDER also holds is compared: the same
header and, per image, the same values in every column but ``time``. Prints ``same rows`` and exits
0, or prints each difference (file, image, column, recorded -> new) and exits 1. Noise is a pure
function of (seed, image, phase, sample), so a re-run of a recorded command gives the same rows on
any machine with the same engine (its graphs: ``engine_id`` in the options files).
"""

from __future__ import annotations

import sys
from pathlib import Path


def read(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = {}
    for line in lines[1:]:
        values = dict(zip(header, line.split("\t")))
        rows[values["idx"]] = {k: v for k, v in values.items() if k != "time"}
    return header, rows


def compare(new: Path, recorded: Path) -> list[str]:
    """The differences between the results files of ``new`` and ``recorded`` (empty: the same)."""
    differences = []
    names = sorted(p.name for p in recorded.glob("*.tsv") if (recorded / f"{p.name}.json").is_file())
    present = [n for n in names if (new / n).is_file()]
    if not present:
        return [f"{new} holds none of the results files of {recorded} ({', '.join(names)})"]
    for name in present:
        old_header, old_rows = read(recorded / name)
        new_header, new_rows = read(new / name)
        if old_header != new_header:
            differences.append(f"{name}: header {old_header} -> {new_header}")
            continue
        for idx in sorted(set(old_rows) | set(new_rows), key=int):
            if idx not in new_rows or idx not in old_rows:
                differences.append(f"{name}: image {idx} only in {'the recorded' if idx in old_rows else 'the new'} file")
                continue
            for column, value in old_rows[idx].items():
                if new_rows[idx][column] != value:
                    differences.append(f"{name}: image {idx} {column} {value} -> {new_rows[idx][column]}")
    return differences


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    new, recorded = map(Path, argv)
    differences = compare(new, recorded)
    if differences:
        print("\n".join(differences))
        return 1
    files = sum(1 for p in recorded.glob("*.tsv") if (recorded / f"{p.name}.json").is_file() and (new / p.name).is_file())
    print(f"same rows: {files} files of {new} equal {recorded} in every column but time")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
