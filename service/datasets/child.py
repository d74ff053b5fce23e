"""Validation in a child process: ``python -m service.datasets.child JOB``.

The API names the files of an upload or an import; the child validates and normalizes them
into ``job.output`` and leaves the outcome beside it. So validation, CPU-bound for seconds
to minutes, never holds the API process's interpreter: other requests keep being answered
while a big upload is checked. (Writing the upload to the child's stdin as it arrives was
measured too: on 2 busy cores the pipe cost more than the overlap saved.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from service.contract import Container, FieldMapping, OnInvalid
from service.datasets.collect import IngestResult, InvalidDataset, Limits, RowError
from service.datasets.containers import DatasetTooLarge, UnsupportedFile
from service.datasets.validate import validate_file


class Job(msgspec.Struct, frozen=True):
    output: str
    """Where the normalized rows go; the outcome goes to ``output + ".outcome"``."""
    files: list[str]
    """The files to read, in order (one dataset)."""
    hint: Container | None
    mapping: FieldMapping | None
    limits: Limits
    on_invalid: OnInvalid
    max_invalid_fraction: float
    processes: int


class Rejected(msgspec.Struct, frozen=True):
    errors: list[RowError]
    total: int
    reason: str | None


class Outcome(msgspec.Struct, frozen=True):
    """Exactly one of the fields is set."""

    result: IngestResult | None = None
    rejected: Rejected | None = None
    unsupported: str | None = None
    too_large: str | None = None

    def unwrap(self) -> IngestResult:
        """The result, or the exception the validation raised."""
        if self.rejected is not None:
            raise InvalidDataset(self.rejected.errors, self.rejected.total, self.rejected.reason)
        if self.unsupported is not None:
            raise UnsupportedFile(self.unsupported)
        if self.too_large is not None:
            raise DatasetTooLarge(self.too_large)
        assert self.result is not None
        return self.result


def outcome_path(job: Job) -> Path:
    return Path(job.output + ".outcome")


def _validate(job: Job) -> IngestResult:
    with open(job.output, "w+b") as dst:
        return validate_file(
            [Path(f) for f in job.files],
            dst,
            hint=job.hint,
            mapping=job.mapping,
            limits=job.limits,
            on_invalid=job.on_invalid,
            max_invalid_fraction=job.max_invalid_fraction,
            processes=job.processes,
        )


def run(job: Job) -> Outcome:
    try:
        return Outcome(result=_validate(job))
    except InvalidDataset as e:
        return Outcome(rejected=Rejected(e.errors, e.total, e.reason))
    except UnsupportedFile as e:
        return Outcome(unsupported=str(e))
    except DatasetTooLarge as e:
        return Outcome(too_large=str(e))


if __name__ == "__main__":
    job = msgspec.json.decode(sys.argv[1], type=Job)
    outcome_path(job).write_bytes(msgspec.msgpack.encode(run(job)))
