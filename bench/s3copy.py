"""Benchmark: S3 to S3, `cpg-daemon upload s3://SRC/ s3://DEST/` against `rclone copy`.

Two `rclone serve s3` servers on 127.0.0.1, the lab's bucket and staging, each with its
own port; the source holds a dataset (written into its served folder before the runs),
the destination is restarted empty for every run. Both clients read from one and write
to the other through the network stack, at their default settings; rounds alternate
the clients (after one uncounted warm-up round each), and every counted run must land
every object with its size (the largest compared byte for byte). Medians of wall time
and client CPU (user + system of the client's process tree, from wait4).

    python3 bench/s3copy.py                      # plate 200 x 2 MiB and large 1 x 256 MiB, 3 runs
    python3 bench/s3copy.py --runs 1 --sizes plate=20x2MiB    # a smoke run

cpg-daemon runs from the project's .venv, rclone from bench/.venv (bench/compare.py makes
it). Results go to bench/RESULTS.md (a section of their own, replaced on a re-run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import (  # noqa: E402
    BENCH_VENV,
    BUCKET,
    KEYS,
    MAIN_VENV,
    RcloneServer,
    machine,
    parse_size,
    same_stream,
    size_label,
)

CLIENTS = ("cpg-daemon", "rclone")
DEFAULT_SIZES = "plate=200x2MiB,large=1x256MiB"
SOURCE_PREFIX = "Batch8"


@dataclass(frozen=True)
class Run:
    client: str
    dataset: str
    wall: float
    cpu: float
    ok: bool


def make_dataset(folder: Path, count: int, size: int) -> dict[str, int]:
    """``count`` files of ``size`` random bytes below ``folder``, in subfolders of 50."""
    sizes = {}
    for index in range(count):
        rel = f"plate{index // 50:02d}/f{index:05d}.bin"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            left = size
            while left:
                chunk = min(left, 8 * 1024 * 1024)
                handle.write(os.urandom(chunk))
                left -= chunk
        sizes[rel] = size
    return sizes


def command(client: str, source: str, dest: str, out: Path, run: int) -> tuple[list[str], dict]:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=KEYS, AWS_SECRET_ACCESS_KEY=KEYS, AWS_REGION="us-east-1")
    if client == "cpg-daemon":
        return [
            str(MAIN_VENV / "bin" / "cpg-daemon"),
            "upload",
            f"s3://{BUCKET}/{SOURCE_PREFIX}/",
            f"s3://{BUCKET}/run{run}/",
            "--endpoint-url",
            dest,
            "--source-endpoint-url",
            source,
            "--state-dir",
            str(out / f"state{run}"),
            "--quiet",
        ], env
    for name, url in (("SRC", source), ("DST", dest)):
        env.update(
            {
                f"RCLONE_CONFIG_{name}_TYPE": "s3",
                f"RCLONE_CONFIG_{name}_PROVIDER": "Rclone",
                f"RCLONE_CONFIG_{name}_ENDPOINT": url,
                f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": KEYS,
                f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": KEYS,
                f"RCLONE_CONFIG_{name}_REGION": "us-east-1",
            }
        )
    return [
        str(BENCH_VENV / "bin" / "rclone"),
        "copy",
        f"src:{BUCKET}/{SOURCE_PREFIX}",
        f"dst:{BUCKET}/run{run}",
        "--config",
        "/dev/null",
    ], env


def timed(argv: list[str], env: dict, timeout: float) -> tuple[float, float, int]:
    """Wall and CPU seconds (the process tree, from wait4) and the exit status; killed
    after ``timeout`` seconds."""
    started = time.monotonic()
    quiet = subprocess.DEVNULL
    process = subprocess.Popen(argv, env=env, stdin=quiet, stdout=quiet, stderr=quiet)
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    process.returncode = code = os.waitstatus_to_exitcode(status)
    return time.monotonic() - started, usage.ru_utime + usage.ru_stime, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"default {DEFAULT_SIZES}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("/dev/shm/cpg-bench-s3copy"))
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    rclone = BENCH_VENV / "bin" / "rclone"
    if not rclone.exists() or not (MAIN_VENV / "bin" / "cpg-daemon").exists():
        raise SystemExit("needs .venv (README) and bench/.venv (python3 bench/compare.py makes it)")
    started = time.time()
    runs: list[Run] = []
    shapes: dict[str, tuple[int, int]] = {}
    for item in args.sizes.split(","):
        name, _, shape = item.partition("=")
        count, _, size = shape.partition("x")
        shapes[name] = (int(count), parse_size(size))
    for dataset, (count, size) in shapes.items():
        out = args.out / dataset
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        source = RcloneServer(rclone, out / "src", out / "src.log")
        dest = RcloneServer(rclone, out / "dst", out / "dst.log")
        source.start_empty()
        sizes = make_dataset(out / "src" / BUCKET / SOURCE_PREFIX, count, size)
        biggest = max(sizes, key=lambda rel: sizes[rel])
        print(f"{dataset}: {count} x {size_label(size)}", flush=True)
        schedule = [("warm-up", c) for c in CLIENTS] + [
            (str(r + 1), c) for r in range(args.runs) for c in CLIENTS
        ]
        try:
            for number, (label, client) in enumerate(schedule):
                dest.start_empty()
                argv, env = command(client, source.endpoint, dest.endpoint, out, number)
                wall, cpu, code = timed(argv, env, args.timeout)
                listed = dest.listing(f"run{number}")
                ok = code == 0 and listed == sizes
                if ok:
                    with (out / "src" / BUCKET / SOURCE_PREFIX / biggest).open("rb") as data:
                        ok = same_stream(data, out / "dst" / BUCKET / f"run{number}" / biggest)
                print(f"  {label:8} {client:11} {wall:7.2f} s wall {cpu:6.2f} s CPU  ok={ok}")
                if label != "warm-up":
                    runs.append(Run(client, dataset, wall, cpu, ok))
        finally:
            source.stop()
            dest.stop()
            shutil.rmtree(out, ignore_errors=True)
    write_results(args, runs, shapes, started)
    return 0 if all(r.ok for r in runs) else 1


def write_results(
    args: argparse.Namespace, runs: list[Run], shapes: dict[str, tuple[int, int]], started: float
) -> None:
    lines = [
        f"## S3 to S3: cpg-daemon upload against rclone copy ({args.sizes}), {args.runs} runs",
        "",
        f"Started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}. Command: "
        f"`python3 bench/s3copy.py --sizes {args.sizes} --runs {args.runs}`. Two `rclone "
        "serve s3` servers on 127.0.0.1 (source and destination, the destination restarted "
        "empty for each run), both clients at their default settings, rounds alternating "
        "after one warm-up round each; medians of the runs where every object landed with "
        "its size (the largest compared byte for byte). CPU: the client's process tree.",
        "",
        "| dataset | client | wall s (range) | client CPU s | MB/s | cpg wall ratio | ok runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for dataset, (count, size) in shapes.items():
        medians = {}
        for client in CLIENTS:
            mine = [r for r in runs if r.dataset == dataset and r.client == client]
            good = [r for r in mine if r.ok]
            if good:
                medians[client] = statistics.median(r.wall for r in good)
        for client in CLIENTS:
            mine = [r for r in runs if r.dataset == dataset and r.client == client]
            good = [r for r in mine if r.ok]
            if not good:
                lines.append(f"| {dataset} | {client} | - | - | - | - | 0/{len(mine)} |")
                continue
            wall = medians[client]
            cpu = statistics.median(r.cpu for r in good)
            spread = f"{min(r.wall for r in good):.2f}-{max(r.wall for r in good):.2f}"
            ratio = medians.get("cpg-daemon", float("nan")) / wall
            label = f"{count} x {size_label(size)}"
            lines.append(
                f"| {dataset} ({label}) | {client} | {wall:.2f} ({spread}) | {cpu:.2f} | "
                f"{count * size / wall / 1e6:.0f} | {ratio:.2f} | {len(good)}/{len(mine)} |"
            )
    info = machine()
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    key = f"s3copy sizes={args.sizes} runs={args.runs}"
    section = "\n".join([f"<!-- begin {key} -->", *lines, f"<!-- end {key} -->", ""])
    text = args.results.read_text() if args.results.exists() else ""
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    args.results.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
