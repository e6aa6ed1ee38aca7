"""The demo job: word statistics of its input file, as a Markdown report.

Shows what a DataSphere job sees: an input file (${TEXT}), an output file (${REPORT}), an
environment variable (GREETING), a local module (textstats), a pip requirement (humanize) and the
progress file named by JOB_PROGRESS_FILENAME.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime

import humanize  # the job's one requirement, installed with pip for this job
import textstats  # the local module


def progress(percent: int, message: str) -> None:
    """One JSON line per update, the format DataSphere documents for JOB_PROGRESS_FILENAME."""
    print(f"[{percent:3d}%] {message}", flush=True)
    path = os.environ.get("JOB_PROGRESS_FILENAME")
    if path:
        with open(path, "a") as f:
            line = {"progress": percent, "message": message, "create_time": datetime.now(UTC).isoformat()}
            f.write(json.dumps(line) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()

    print(os.environ.get("GREETING", "(GREETING is not set)"), flush=True)
    print(
        f"python {platform.python_version()}, humanize from {os.path.dirname(humanize.__file__)}", flush=True
    )
    progress(10, f"reading the input ({humanize.naturalsize(os.path.getsize(args.text))})")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    time.sleep(1)

    progress(50, "counting words")
    stats = textstats.summary(text)
    top = textstats.top_words(text, args.top)
    time.sleep(1)

    progress(90, "writing the report")
    lines = ["# Word statistics", ""]
    lines += [f"- {name}: {humanize.intcomma(count)}" for name, count in stats.items()]
    lines += [
        "",
        f"## Top {len(top)} words (longer than 3 letters)",
        "",
        "| rank | word | count |",
        "|---|---|---|",
    ]
    lines += [f"| {humanize.ordinal(i)} | {word} | {count} |" for i, (word, count) in enumerate(top, 1)]
    with open(args.report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for i, (word, count) in enumerate(top, 1):
        print(f"{humanize.ordinal(i):>5}  {word:<12} {count}", flush=True)
    progress(100, f"done: {humanize.apnumber(len(top))} top words of {stats['words']}")


if __name__ == "__main__":
    main()
