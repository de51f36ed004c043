"""python -m bench.hostile: time and peak memory of the refusal of each hostile-input family (issue #38's targets: under
30 s, one line, exit 2, under 1 GB for inputs under 10 MB).

Each case writes a small hostile input into a fresh folder and runs the command a user would (`python -m stages
ingest`, `review import`, `guard`) in a child process that reports its own peak resident memory. Writes
bench/results/hostile.json and hostile.md.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from sanitizer.fileio import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
# Runs the command in-process and reports peak RSS (kB on Linux) on the last line of stderr.
DRIVER = ("import resource, sys\nfrom stages.__main__ import main\ncode = main(sys.argv[1:])\n"
          "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)\n")
TIMEOUT = 60


def npy_header(shape, descr="|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"shape": shape, "fortran_order": False, "descr": descr})
    return buf.getvalue()


def small(shape, dtype=np.uint8) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype))
    return buf.getvalue()


def zero_bomb(path: Path, gigabytes: float = 2.0) -> None:
    """An npz whose x_train is `gigabytes` of zeros, deflated to a few MB (written in chunks, never held)."""
    n = int(gigabytes * 2**30) // 3072
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("x_train.npy", "w", force_zip64=True) as fh:
            fh.write(npy_header((n, 32, 32, 3)))
            chunk = bytes(3072 * 4096)
            for start in range(0, n, 4096):
                fh.write(chunk[:3072 * min(4096, n - start)])
        z.writestr("y_train.npy", small(2, np.int64))
        z.writestr("x_test.npy", small((1, 32, 32, 3)))
        z.writestr("y_test.npy", small(1, np.int64))


def lying_header(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x_train.npy", npy_header((2_000_000, 32, 32, 3)) + bytes(3072 * 4))
        z.writestr("y_train.npy", small(4, np.int64))
        z.writestr("x_test.npy", small((1, 32, 32, 3)))
        z.writestr("y_test.npy", small(1, np.int64))


def png(width: int, height: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def image_folder(root: Path, make) -> None:
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(30):
                (folder / f"{k}.png").write_bytes(make())


def cifar_folder(root: Path, batch: bytes | None) -> None:
    root.mkdir()
    good = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 0, 1]}, protocol=2)
    (root / "test_batch").write_bytes(good)
    if batch is None:
        (root / "data_batch_1").symlink_to("/dev/zero")
    else:
        (root / "data_batch_1").write_bytes(batch)


class ObjectArray:
    """A pickled object array of 2**33 elements: numpy's own unpickling would zero-fill 64 GB first."""

    def __reduce__(self):
        return (np.empty(0).__reduce__()[0], (np.ndarray, (0,), b"b"), (1, (2**33,), np.dtype("O"), False, []))


def alias_bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    return "\n".join(lines) + "\nseed: *i\n"


def params_for(source: str, path: str) -> str:
    return f"data:\n  source: {source}\n  path: {path}\nredteam:\n  attack: null\n"


def cases() -> dict:
    """name -> (writes the input into a folder and returns the command's arguments)."""
    def npz(write):
        def setup(d: Path):
            write(d / "d.npz")
            (d / "params.yaml").write_text(params_for("npz", "d.npz"))
            return ["ingest"]
        return setup

    def folder(make):
        def setup(d: Path):
            image_folder(d / "imgs", make)
            (d / "params.yaml").write_text(params_for("imagefolder", "imgs"))
            return ["ingest"]
        return setup

    def cifar(batch):
        def setup(d: Path):
            cifar_folder(d / "c", batch)
            (d / "params.yaml").write_text(params_for("cifar10", "c"))
            return ["ingest"]
        return setup

    def params_file(text):
        def setup(d: Path):
            (d / "params.yaml").write_text(text)
            return ["ingest"]
        return setup

    def fifo(d: Path):
        os.mkfifo(d / "d.npz")
        (d / "params.yaml").write_text(params_for("npz", "d.npz"))
        return ["ingest"]

    def decisions(d: Path):
        (d / "data/quarantine").mkdir(parents=True)
        (d / "data/quarantine/quarantine.csv").write_text("id,label\na,0\nb,0\nc,1\n")
        with open(d / "decisions.csv", "w") as fh:
            fh.write("id,decision,note\na,release,x\nb,maybe,x\n")
            for _ in range(9000):
                fh.write("c,confirm," + "y" * 1000 + "\n")
        return ["review", "import", "decisions.csv"]

    return {
        "npz: 2 GB of zeros deflated": npz(zero_bomb),
        "npz: header declares 6 GB, holds 12 KB": npz(lying_header),
        "npz path is a FIFO": fifo,
        "images: 120 PNGs declaring 9000x9000": folder(lambda: png(9000, 9000, b"\0" * 64)),
        "images: 120 flat 1500x1500 PNGs": folder(lambda: png(1500, 1500, (b"\0" + bytes(4500)) * 1500)),
        "cifar: data_batch_1 links to /dev/zero": cifar(None),
        "cifar: pickled 64 GB object array": cifar(pickle.dumps({b"data": ObjectArray(), b"labels": []}, protocol=2)),
        "params.yaml: 900-byte alias bomb": params_file(alias_bomb()),
        "params.yaml: nested 100,000 deep": params_file("seed: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        "decisions: 9 MB for 3 suspects, bad row 3": decisions,
    }


def input_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def run_case(name: str, setup) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        args = setup(d)
        size = input_bytes(d)
        env = dict(os.environ, PYTHONPATH=str(ROOT), GX_ANALYTICS_ENABLED="False")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=d, env=env, capture_output=True,
                                  text=True, timeout=TIMEOUT)
            code, err = proc.returncode, proc.stderr.strip().splitlines()
        except subprocess.TimeoutExpired:
            code, err = None, [f"no answer in {TIMEOUT} s"]
        seconds = time.perf_counter() - t0
    rss = next((int(line.split()[1]) for line in reversed(err) if line.startswith("maxrss ")), None)
    message = [line for line in err if not line.startswith("maxrss ")]
    return {"case": name, "input_mb": round(size / 2**20, 2), "exit": code, "seconds": round(seconds, 1),
            "peak_mb": round(rss / 1024) if rss else None, "lines": len(message),
            "message": message[-1][:160] if message else ""}


def markdown(rows: list[dict]) -> str:
    lines = ["# Hostile input: time and memory of each refusal", "",
             "`python -m bench.hostile`. Each case runs the user's command in a child process (peak resident memory "
             "of that process, Python and its imports included). Targets (issue #38): exit 2, one line, under 30 s, "
             "under 1 GB for inputs under 10 MB.", "",
             "| case | input MB | exit | lines | seconds | peak MB | message |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['input_mb']} | {r['exit']} | {r['lines']} | {r['seconds']} | "
                     f"{r['peak_mb']} | {r['message'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    rows = []
    for name, setup in cases().items():
        rows.append(run_case(name, setup))
        r = rows[-1]
        print(f"[hostile] {name}: exit {r['exit']}, {r['seconds']} s, {r['peak_mb']} MB", file=sys.stderr)
    write_json(args.out / "hostile.json", rows)
    write_text(args.out / "hostile.md", markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
