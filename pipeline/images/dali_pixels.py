"""DALI's resize/normalize/mirror graph on pixels already in memory: the aligned face crops of --faces detect|box.

The DALI file decoder (dali_decoder.build_dali_pipeline) starts from encoded bytes, but face crops are cut
out of the decoded picture first (faces/crops.py), and re-encoding them would add a lossy step. This graph
takes the 200x200 uint8 HWC crops through an external source instead and runs the file decoder's own steps
after decoding, with the same settings, into [B, 2, 3, S, S] float32 plain and mirrored views. On the CPU it
matches the file decoder on the same pixels to float rounding, and the torch resize path within the
DALI-vs-torch tolerance (tests/faces/test_face_dali.py). With a device id the crops are resized on that GPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.constants import IMAGE_SIZE
from pipeline.images.dali_decoder import dali_device_id, dali_two_views

PIXELS_INPUT = "pixels"


def build_pixel_pipeline(batch_size: int, num_threads: int, device_id: int | None):
    """The two-view graph on uint8 HWC RGB arrays fed through the external source "pixels".

    device_id None: every op on the CPU; otherwise the crops move to that GPU before the resize.
    """
    from nvidia.dali import fn, pipeline_def, types

    # prefetch_queue_depth=1: each run consumes exactly the batch fed to it, as in dali_decoder.build_dali_pipeline.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    def two_views():
        rgb = fn.external_source(name=PIXELS_INPUT, dtype=types.UINT8, ndim=3, layout="HWC")
        if device_id is not None:
            rgb = rgb.gpu()
        return dali_two_views(rgb)   # the file decoder's resize and normalize, unchanged

    pipe = two_views()
    pipe.build()
    return pipe


class DaliPixels:
    """Crops in, [B, 2, 3, S, S] float32 views out (on `device`), through one DALI pipeline built once."""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64, num_threads: int = 2):
        self.device = torch.device(device)
        self.name = "dali-gpu" if self.device.type == "cuda" else "dali-cpu"
        self._batch_size = batch_size
        self._pipe = build_pixel_pipeline(batch_size, num_threads, dali_device_id(self.device))

    def __call__(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        if not len(crops):
            return torch.empty((0, 2, 3, IMAGE_SIZE, IMAGE_SIZE), device=self.device)
        parts = [self._run(crops[start:start + self._batch_size])
                 for start in range(0, len(crops), self._batch_size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _run(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        (views,) = self._pipe.run(**{PIXELS_INPUT: [np.ascontiguousarray(c, dtype=np.uint8) for c in crops]})
        views = views.as_tensor()
        out = torch.empty(views.shape(), dtype=torch.float32, device=self.device)
        if self.device.type == "cuda":
            # Copy out on the current stream and wait: the next run reuses DALI's output buffers.
            stream = torch.cuda.current_stream(self.device)
            feed_ndarray(views, out, cuda_stream=stream)
            stream.synchronize()
        else:
            feed_ndarray(views, out)
        return out
