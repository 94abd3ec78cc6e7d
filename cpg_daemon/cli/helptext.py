"""Examples for each command's ``--help``: what a person types, and what it does.

``main.build_parser`` adds them to every command as its epilog (kept as written, while
the description above it is wrapped to the terminal), and gives a command without a
description its one-line help as one, so ``cpg-daemon COMMAND --help`` says what the
command does before how to call it.
"""

from __future__ import annotations

import argparse
import textwrap

STAGING = "s3://staging-cellpainting-gallery/cpg0123-example/broad"

EXAMPLES: dict[str, str] = {
    "run": """\
example:
  cpg-daemon run -c /etc/cpg-daemon/config.toml   # in a terminal; systemd runs the same
""",
    "check": """\
examples:
  cpg-daemon check --offline -c config.toml   # the file, and what each watch would upload
  cpg-daemon check -c config.toml             # also gets keys and proves write access
  cpg-daemon check --json -c config.toml | jq '.problems'
""",
    "upload": f"""\
examples:
  # a batch, with the keys the gallery's S3 Access Grants give the profile cpg_staging
  cpg-daemon upload /data/outbox/2024_04_01_Batch8 \\
      {STAGING}/images/2024_04_01_Batch8/ \\
      --access-grants --profile cpg_staging

  # what it would send, file by file, compared with what is there; nothing is sent
  cpg-daemon upload --dry-run /data/outbox/Batch8 s3://BUCKET/PREFIX/

  # only the TIFFs, not the thumbnails; to a bucket that is not the gallery
  cpg-daemon upload /data/plate1 s3://lab-bucket/plate1/ \\
      --include '**/*.tiff' --exclude '**/thumbs' --structure off

  # from a script: errors only on stderr, one JSON summary on stdout
  cpg-daemon upload --quiet --json /data/plate1 s3://BUCKET/plate1/ | jq .failed

Re-running the same command resumes an interrupted upload (multipart uploads part
by part) and skips what is already there. Exit status: 0 every file uploaded or
already there, 1 some failed (each named on stderr), 2 bad arguments.
""",
    "check-dataset": """\
examples:
  cpg-daemon check-dataset s3://cellpainting-gallery/cpg0016-jump/source_4/ --no-sign-request
  cpg-daemon check-dataset /data/outbox/cpg0123-example/broad --json > report.json
""",
    "status": """\
examples:
  cpg-daemon status                  # uploads, throughput, time left, errors, keys
  cpg-daemon status --watch          # the same, refreshed every second
  cpg-daemon status --json | jq '.watches[] | {name, files}'
""",
    "pause": """\
examples:
  cpg-daemon pause                   # every watch
  cpg-daemon pause batch8-images     # one watch; `cpg-daemon resume batch8-images` undoes it
""",
    "resume": """\
example:
  cpg-daemon resume batch8-images
""",
    "retry": """\
example:
  cpg-daemon retry                   # failed files of every watch are queued again
""",
    "rescan": """\
example:
  cpg-daemon rescan batch8-images    # walk its folder now, not at the next rescan_interval
""",
    "reload": """\
example:
  cpg-daemon reload                  # after editing /etc/cpg-daemon/config.toml
""",
    "verify": """\
examples:
  cpg-daemon verify                                    # every watch; exit 1 on a difference
  cpg-daemon verify batch8-images --report report.csv  # every file's line as CSV
  cpg-daemon verify --manifest Batch8-20261202T162000Z.jsonl --no-sign-request \\
      --destination s3://cellpainting-gallery/cpg0123-example/broad/
  cpg-daemon verify --json | jq '.counts'
""",
    "manifest": """\
example:
  cpg-daemon manifest batch8-images 2024_04_01_Batch8 -o Batch8.jsonl
""",
    "recover-journal": """\
example:
  systemctl stop cpg-daemon && cpg-daemon recover-journal -c /etc/cpg-daemon/config.toml
""",
    "demo": """\
example:
  cpg-daemon demo --once             # upload a sample plate to a local server, verify, exit
""",
    "credentials": f"""\
example:
  aws s3control get-data-access --account-id 309624411020 --region us-east-1 \\
      --target '{STAGING.rsplit("/", 1)[0]}/*' --permission READWRITE \\
      --profile cpg_staging | cpg-daemon credentials set
""",
    "config": """\
example:
  cpg-daemon config --example > /etc/cpg-daemon/config.toml
""",
    "install-service": """\
example:
  cpg-daemon install-service --aws-credentials /etc/cpg-daemon/aws-credentials \\
      --output /etc/systemd/system/
""",
}


def add_examples(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Every command gets its examples, and its one-line help as its description when it
    has none; a command without examples is a mistake (KeyError)."""
    helps = {action.dest: action.help for action in commands._choices_actions}
    for name, parser in commands.choices.items():
        description = parser.description or helps.get(name) or ""
        text = description[0].upper() + description[1:] if description else ""
        parser.description = textwrap.fill(
            text + ("." if text[-1:] not in ".)" else ""), 88, break_on_hyphens=False
        )
        parser.epilog = EXAMPLES[name]
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
