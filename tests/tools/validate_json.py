"""Validate JSON instances with Python's jsonschema, as a Python integrator would.

    validate_json.py SCHEMA_DIR CASES

CASES holds one JSON object per line, {"schema": "<file name in SCHEMA_DIR>", "instance": ...}.
Prints one line per case, in order: {"valid": true|false, "errors": ["..."]}. Format checking is
on (draft 2020-12 with the format checker; date-time needs rfc3339-validator, pinned in
requirements.txt).
"""

import json
import pathlib
import sys

from jsonschema import Draft202012Validator


def main() -> None:
    schema_dir = pathlib.Path(sys.argv[1])
    validators = {}
    with open(sys.argv[2], encoding="utf-8") as cases:
        for line in cases:
            case = json.loads(line)
            name = case["schema"]
            if name not in validators:
                schema = json.loads((schema_dir / name).read_text(encoding="utf-8"))
                Draft202012Validator.check_schema(schema)
                validators[name] = Draft202012Validator(
                    schema, format_checker=Draft202012Validator.FORMAT_CHECKER
                )
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validators[name].iter_errors(case["instance"])
            ]
            print(json.dumps({"valid": not errors, "errors": errors}))


if __name__ == "__main__":
    main()
