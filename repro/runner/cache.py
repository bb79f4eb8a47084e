"""The job cache: one JSON file per job key, checked against the key stored in it before it is used.

``<cache>/jobs/<target>/<hash>.json`` = ``{"key": <the job's full key>, "result": ...}``. The key names the
job function, every argument it receives (config fields, seeds, the data's content fingerprint, the endpoints
it loads), the code version and the device type. A file whose stored key differs from the requested one, or
that does not parse into the expected result, is reported by path and recomputed: never used, never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reference.checkpoint import atomic_write_text

from .declare import Job
from .util import canonical, config_hash, jsonable, restore_floats

__all__ = ["JobCache", "job_key"]


def job_key(job: Job, code: str, device: str) -> dict[str, Any]:
    """What a job's result depends on: its name and arguments, the code, and ``device`` (where the floats are
    computed: ``repro.runner.context.device_description``, with the jobs' thread count)."""
    return {"job": job.name, "args": jsonable(job.args), "code": code, "device": device}


class JobCache:
    def __init__(self, root: Path, log=print):
        self.root = Path(root)
        self.log = log

    def path(self, key: Any) -> Path:
        return self.root / f"{config_hash(key)}.json"

    def get(self, key: Any, result_type: type = dict) -> tuple[bool, Any]:
        path = self.path(key)
        if not path.is_file():
            return False, None
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict) or "key" not in stored or "result" not in stored:
                raise ValueError("not a job record ({'key', 'result'})")
            if canonical(stored["key"]) != canonical(key):
                self.log(f"  cached job {path} was stored under another key; recomputing it")
                return False, None
            result = restore_floats(stored["result"])
            if not isinstance(result, result_type):
                raise ValueError(f"its result is a {type(result).__name__}, expected {result_type.__name__}")
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            self.log(f"  cached job {path} is unreadable ({e}); recomputing it")
            return False, None
        return True, result

    def put(self, key: Any, result: Any) -> Any:
        value = jsonable(result)
        atomic_write_text(json.dumps({"key": jsonable(key), "result": value}), self.path(key))
        return restore_floats(value)
