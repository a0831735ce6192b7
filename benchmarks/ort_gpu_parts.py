"""Make onnxruntime-gpu small enough to carry to the lent GPU machine (which has no package index).

The onnxruntime-gpu wheel is 255 MB; a call of the device tool carries 64 MiB with the repository.
Most of the wheel is ``libonnxruntime_providers_cuda.so``'s ``.nv_fatbin`` section (219 MB): CUDA
kernels for sm_75, 80, 86, 89, 90 and 120. This script keeps the sm_90 (H100/H200) entries and zeroes
the payloads of the others in place (their headers, sizes and the ELF layout are untouched, so the
driver still parses every fatbin and picks the sm_90 entry), drops the TensorRT provider and the
transformers/quantization/tools sub-packages, and packs the rest with xz: 69 MB, in two parts.

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d /tmp/ortgpu onnxruntime-gpu==1.31.1
    python benchmarks/ort_gpu_parts.py /tmp/ortgpu/onnxruntime_gpu-1.31.1-*.whl   # writes .ortgpu_a/ .ortgpu_b/

Then one call carrying ``.ortgpu_a`` copies its part to /tmp/ortparts, and the next call (within the
machine's 30 s warm window) carries ``.ortgpu_b`` and runs ``benchmarks/device_run.sh``, which
joins, unpacks and puts the package first on PYTHONPATH. Both folders must be listed in
``.git/info/exclude`` so that they travel only when carried. Ran this way on 2026-11-25 (H100,
driver 580.159.04, CUDA 13.0): ONNX Runtime 1.31.1 listed the CUDA provider and the gpu tests passed.
"""

from __future__ import annotations

import io
import lzma
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

from harness import add_out, parser

FATBIN_MAGIC = 0xBA55ED50
DROP = ("onnxruntime/transformers/", "onnxruntime/quantization/", "onnxruntime/tools/", "providers_tensorrt")


def keep_arch(so: bytes, arch: int = 90) -> tuple[bytes, dict]:
    """The shared object with every fatbin entry not for sm_``arch`` zeroed; and what was done."""
    data = bytearray(so)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]
    fat = next(s for s in sections if data[names + s[0]: data.index(b"\0", names + s[0])] == b".nv_fatbin")
    start, size = fat[4], fat[5]
    pos, zeroed, kept, fatbins = start, 0, 0, 0
    while pos < start + size:
        magic, _version, header, body = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned
            continue
        fatbins += 1
        entry, end = pos + header, pos + header + body
        while entry < end:
            _kind, _flags, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            entry_arch = struct.unpack_from("<I", data, entry + 28)[0]
            if entry_arch != arch:
                data[entry + entry_header: entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            else:
                kept += payload
            entry += entry_header + payload
        pos = end
    return bytes(data), {"fatbins": fatbins, "zeroed_mb": round(zeroed / 1e6, 1), "kept_mb": round(kept / 1e6, 1)}


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("wheel", help="the onnxruntime-gpu wheel (manylinux x86_64, CPython 3.12)")
    ap.add_argument("--arch", type=int, default=90, help="SM architecture to keep (default: %(default)s, Hopper)")
    add_out(ap, "where .ortgpu_a/ and .ortgpu_b/ go", default=Path("."))
    args = ap.parse_args(argv)
    buf = io.BytesIO()
    with zipfile.ZipFile(args.wheel) as wheel, tarfile.open(fileobj=buf, mode="w") as tar:
        for info in wheel.infolist():
            name = info.filename
            if not name.startswith("onnxruntime/") or name.endswith("/") or any(d in name for d in DROP):
                continue
            blob = wheel.read(info)
            if name.endswith("libonnxruntime_providers_cuda.so"):
                blob, what = keep_arch(blob, args.arch)
                print(f"{name}: {what}", file=sys.stderr)
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(blob), 0o755 if name.endswith(".so") or ".so." in name else 0o644
            tar.addfile(member, io.BytesIO(blob))
    packed = lzma.compress(buf.getvalue(), preset=6)
    half = (len(packed) + 1) // 2
    for suffix, part in (("a", packed[:half]), ("b", packed[half:])):
        folder = Path(args.out) / f".ortgpu_{suffix}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part_a{suffix}").write_bytes(part)
    print(f"{len(packed) / 1e6:.1f} MB in two parts: {args.out}/.ortgpu_a/part_aa, {args.out}/.ortgpu_b/part_ab", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
