"""Where ``rdm dataset`` may write: never over, into or around its source, and ``--overwrite`` replaces only
the tool's own earlier outputs (and their reports)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from relay_diffusion.data.writer import is_dataset_output

REPORT_SUFFIX = ".report.json"


class DatasetToolError(ValueError):
    """A problem with the user's input. ``option`` names the command-line option at fault, if one is;
    ``usage`` marks errors fixed by passing another option."""

    def __init__(self, message: str, option: str | None = None, usage: bool = False) -> None:
        super().__init__(message)
        self.option = option
        self.usage = usage


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def report_path_of(dest: str) -> str:
    return dest.rstrip("/\\") + REPORT_SUFFIX


def _is_report(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "source_kind" in data and "outputs" in data


def check_dests(source: str, dests: Sequence[str], overwrite: bool) -> None:
    """Refuse any output that would write over, into or around the source, or replace something the tool did
    not write (``--overwrite`` replaces only earlier outputs: ``writer.is_dataset_output``)."""
    src = os.path.realpath(source)
    for dest in dests:
        real = os.path.realpath(dest)
        if real == src:
            raise DatasetToolError(f"{dest!r} is the --source: the output must not replace its input", option="--dest")
        if _inside(src, real):
            raise DatasetToolError(f"{dest!r} contains the --source {source!r}: choose an output beside it",
                                   option="--dest")
        # A new zip inside a source folder changes none of its images; replacing a file there, or a folder of
        # PNGs (images of the source from then on), would.
        if os.path.isdir(src) and _inside(real, src) and (os.path.lexists(dest) or not dest.lower().endswith(".zip")):
            raise DatasetToolError(f"{dest!r} is inside the --source folder {source!r}: choose an output outside it",
                                   option="--dest")
        if os.path.lexists(dest):
            if not overwrite:
                raise DatasetToolError(f"{dest!r} already exists (pass --overwrite to replace it)", option="--dest")
            if not is_dataset_output(dest):
                kind = "zip" if dest.lower().endswith(".zip") else "folder"
                raise DatasetToolError(
                    f"{dest!r} is not a dataset {kind} written by rdm dataset (only dataset.json and "
                    "NNNNN/imgNNNNNNNN.png), so --overwrite does not replace it: move it away or choose another --dest",
                    option="--dest",
                )
        report = report_path_of(dest)
        if os.path.lexists(report) and not (os.path.isfile(report) and _is_report(report)):
            raise DatasetToolError(f"{report!r} exists and is not a report of rdm dataset: move it away",
                                   option="--dest")
