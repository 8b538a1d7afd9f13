"""The resume folder beside a feature file: one crash-safe part per finished batch."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.features import provenance
from pipeline.features.safe_io import NotEnoughSpace, is_no_space
from pipeline.features.settings import SettingsMismatch, settings_difference
from pipeline.files import fsync_dir, write_bytes_atomically


@dataclass
class Part:
    start: int                 # first record index of the batch
    stop: int                  # one past the last
    path: Path


class PartsFolder:
    """Finished batches of an unfinished job, one .npz file each."""

    def __init__(self, out_path: Path, settings: dict, allow_mixed: bool = False):
        """allow_mixed: resume an unfinished job computed another way (its parts keep their own compute record)."""
        self.folder = Path(str(out_path) + ".parts")
        self.settings = settings
        manifest = self.folder / "settings.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())
            difference = settings_difference(found, settings, allow_mixed)
            if difference:
                raise SettingsMismatch(
                    f"{self.folder} holds an unfinished job with other settings:\n"
                    f"{difference}\n"
                    f"Rerun with the same settings to resume, or delete {self.folder} to start over."
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(manifest, json.dumps(settings, indent=1, sort_keys=True).encode())

    def parts(self) -> list[Part]:
        found = []
        for path in self.folder.glob("rows-*.npz"):
            start, stop = (int(x) for x in path.stem.split("-")[1:3])
            found.append(Part(start, stop, path))
        return sorted(found, key=lambda p: p.start)

    def records(self) -> list[dict]:
        """The distinct compute records of the finished batches (parts from before the record: the manifest's)."""
        found = []
        for part in self.parts():
            with np.load(part.path) as batch:
                found.append(provenance.part_record(batch, self.settings.get(provenance.COMPUTE_KEY)))
        return provenance.records({provenance.COMPUTE_KEY: provenance.combined(found)})

    def rows_done(self) -> int:
        """Records covered by finished batches, which always form a prefix."""
        done = 0
        for part in self.parts():
            if part.start != done:
                break
            done = part.stop
        return done

    def write(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
        """Save one finished batch. Only after the rename does it count as done."""
        final = self.folder / f"rows-{start:09d}-{stop:09d}.npz"
        needed = sum(np.asarray(a).nbytes for a in arrays.values()) + 4096  # the part's size, about
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as handle:
            try:
                # Each part carries how it was computed: a resumed job may have computed its rows another way.
                np.savez(handle, **arrays, compute=provenance.part_array(self.settings))
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException as err:  # disk full, Ctrl-C: no half-written .tmp left behind
                try:
                    handle.close()  # now, so that the failing flush of a full disk cannot mask this error
                except OSError:
                    pass
                Path(handle.name).unlink(missing_ok=True)
                if is_no_space(err):
                    raise NotEnoughSpace(f"no space left on the device while saving a batch to {self.folder} "
                                         f"(a batch needs about {needed / 2**20:.1f} MiB, "
                                         f"{shutil.disk_usage(self.folder).free / 2**20:.1f} MiB free now); "
                                         f"free some space and rerun the same command to resume") from err
                raise
        os.replace(handle.name, final)
        fsync_dir(self.folder)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
