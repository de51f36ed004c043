"""`python -m stages <stage>`: the entry point dvc.yaml calls.

Exit codes: 0 done, 1 the gate blocked the release, 2 bad input or settings (one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGES = ("ingest", "isolate", "recheck", "quarantine", "unlearn", "export", "gate")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["review"], ["guard"]):
        return command(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="python -m stages", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*STAGES, "schema", "review", "guard"], help="a pipeline stage, `schema` "
                        "to regenerate schemas/params.schema.json, `review` (see `review --help`) or `guard IMAGE...` "
                        "(see `guard --help`)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)

    from sanitizer.config import SCHEMA_FILE, load_params, schema_json
    from sanitizer.errors import GateFailed, SanitizeError
    from sanitizer.fileio import write_text

    if args.command == "schema":
        write_text(SCHEMA_FILE, schema_json())
        print(f"wrote {SCHEMA_FILE}", file=sys.stderr)
        return 0
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    try:
        params = load_params(args.params)
        importlib.import_module(f"stages.{args.command}").run(params)
    except SanitizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except GateFailed as err:
        print(f"gate: {err}", file=sys.stderr)
        return 1
    return 0


def command(name: str, argv: list[str]) -> int:
    """`review` and `guard`: commands for people, beside the stages."""
    from sanitizer.errors import SanitizeError

    entry = importlib.import_module({"review": "sanitizer.review", "guard": "sanitizer.guard_cli"}[name]).main
    try:
        return entry(argv)
    except SanitizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `review list | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
